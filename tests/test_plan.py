"""`ream-lite plan` and the estimate behind it: output bytes and checkpoint reads equal what `compress` really
writes and reads; the command prints a short table and valid JSON; real model shapes (headers only, sparse data)
plan inside a 24 GB card; the disk-space check refuses before any work."""

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build_model, save_model
from transformers import DeepseekV3Config

from ream_lite.arch import ModelLayout
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.cli import main
from ream_lite.diskspace import check_disk_space, disk_shortfall
from ream_lite.engine.budget import GiB
from ream_lite.engine.streamer import StreamOptions
from ream_lite.errors import ReamLiteError
from ream_lite.estimate import estimate_compression
from ream_lite.pipeline import CompressConfig, compress, resolve_keep, validate
from ream_lite.refit import RefitOptions
from ream_lite.sparse_checkpoint import write_sparse_checkpoint


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def estimate(path, experts, measure=False, **kw):
    stream = StreamOptions(**{"device": "cpu", "progress": False, **kw.pop("stream", {})})
    layout = ModelLayout(str(path))
    cfg = CompressConfig(model=str(path), output=str(path) + "-out", experts=experts, stream=stream, **kw)
    n_keep = resolve_keep(layout, experts)
    validate(layout, n_keep, cfg)
    return estimate_compression(layout, cfg, n_keep, measure=measure)


def compress_and_estimate(src, out, experts, monkeypatch, stream: dict | None = None, **settings):
    """Compress `src` into `out` on the CPU and plan the same run: (the plan's estimate, the most bytes one reader of
    `src` read while compressing)."""
    read = reads_of(src, monkeypatch)
    compress(CompressConfig(model=str(src), output=str(out), experts=experts,
                            stream=StreamOptions(device="cpu", progress=False, **(stream or {})), **settings))
    return estimate(src, experts, stream=stream or {}, **settings), max(read)


def tensor_bytes(directory) -> int:
    with CheckpointReader(directory) as r:
        return r.total_bytes()


def reads_of(src, monkeypatch) -> list[int]:
    """Bytes each reader of checkpoint `src` read, recorded when it is closed."""
    read: list[int] = []
    close = CheckpointReader.close

    def record(self):
        if self.dir.resolve() == src.resolve():
            read.append(self.bytes_read)
        close(self)

    monkeypatch.setattr(CheckpointReader, "close", record)
    return read


@pytest.mark.parametrize("family,experts", [("qwen3_moe", 6), ("deepseek_v3", 12), ("gpt_oss", 0.5),
                                           ("ernie4_5_moe", 0.5), ("granitemoe", 0.5)])
def test_predicted_output_bytes_equal_the_real_output(model_dirs, tmp_path, family, experts):
    src = model_dirs[family][1]
    out = tmp_path / "out"
    r = run("compress", src, out, "--experts", experts, "--method", "reap", "--num-sequences", 8, "--seq-len", 32,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    est = estimate(src, experts, method="reap", num_sequences=8, seq_len=32)
    assert est.output_bytes == tensor_bytes(out)
    assert est.output_bytes < est.input_bytes


def test_output_bytes_of_a_fused_layout(tmp_path):
    src = save_model(build_model("qwen3_moe", seed=1), tmp_path / "fused", layout="fused")
    assert {x.expert_storage for x in ModelLayout(str(src)).moe_layers} == {"fused"}
    r = run("compress", src, tmp_path / "out", "--experts", 5, "--method", "reap", "--num-sequences", 8,
            "--seq-len", 32, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert estimate(src, 5, method="reap", num_sequences=8, seq_len=32).output_bytes == tensor_bytes(tmp_path / "out")


@pytest.mark.parametrize("drop_mtp", [False, True])
def test_mtp_layers_are_counted_unless_dropped(tmp_path, monkeypatch, drop_mtp):
    from tiny_models import save_mtp_model

    src = save_mtp_model(tmp_path / "ds")
    settings = {"method": "reap", "num_sequences": 8, "seq_len": 32, "drop_mtp": drop_mtp}
    est, read = compress_and_estimate(src, tmp_path / "out", 8, monkeypatch, **settings)
    assert est.output_bytes == tensor_bytes(tmp_path / "out")
    assert est.read_bytes == read
    mtp = [x for x in est.layers if x.kind == "mtp"]
    assert len(mtp) == 1 and (mtp[0].output_bytes == 0) == drop_mtp
    assert ("dropped" in "\n".join(est.lines())) == drop_mtp


@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("method,guard,sequential,exact", [
    ("reap", None, True, True), ("reap", None, False, True), ("ream", "off", True, True), ("ream", "group", True, False),
])
def test_predicted_reads_match_what_compress_reads(model_dirs, tmp_path, monkeypatch, method, guard, sequential, exact,
                                                   cache):
    """Every checkpoint byte compress reads is counted, with the layer's experts kept on the device (read once) or
    re-read by every pass: exactly where the passes are fixed; with the guard, an upper bound (it may choose
    pruning, and then writes no merged expert), within 15%."""
    src = model_dirs["deepseek_v3"][1]
    settings = {"method": method, "guard": guard, "num_sequences": 8, "seq_len": 32, "sequential": sequential}
    est, actual = compress_and_estimate(src, tmp_path / "out", 12, monkeypatch, stream={"expert_cache": cache},
                                        **settings)
    assert est.memory.cache_experts == (cache == "auto")  # (a tiny model always fits)
    predicted = est.read_bytes
    if exact:
        assert predicted == actual
    else:
        assert actual <= predicted <= 1.15 * actual


def test_with_the_cache_guarded_ream_reads_each_layers_experts_once(model_dirs, tmp_path, monkeypatch):
    """The guard's many passes (statistics, alignment, merges, every candidate, the undo, the sequential pass) share
    one read of each MoE layer's experts, and the output's kept experts are written from that same read (the cache
    holds their stored bytes: per-expert tensors in the compute dtype): each expert byte is read exactly once."""
    src = model_dirs["deepseek_v3"][1]
    settings = {"method": "ream", "guard": "group", "num_sequences": 8, "seq_len": 32}
    est, read = compress_and_estimate(src, tmp_path / "out", 12, monkeypatch, **settings)
    layers = {L["layer"]: L for L in json.loads((tmp_path / "out" / "ream_plan.json").read_text())["layers"]}
    expected = est.other_bytes + est.embed_bytes
    for x in est.layers:
        expected += 2 * x.non_expert_bytes  # built to run the layer, then copied
        if x.experts:
            assert layers[x.index]["kept"]
            expected += x.expert_bytes
            assert x.read_bytes == 2 * x.non_expert_bytes + x.expert_bytes
    assert read == expected
    assert any("read once for all its passes" in line for line in est.lines())


def test_reads_with_the_cache_in_a_narrower_compute_dtype(model_dirs, tmp_path, monkeypatch):
    """A float32 checkpoint run in bfloat16: the cached bf16 copy cannot give the merges their exact float32
    weights, so those loads (and only those) read the checkpoint; the prediction follows."""
    src = model_dirs["deepseek_v3"][1]
    settings = {"method": "ream", "guard": "off", "num_sequences": 8, "seq_len": 32}
    stream = {"dtype": torch.bfloat16}
    est, read = compress_and_estimate(src, tmp_path / "out", 12, monkeypatch, stream=stream, **settings)
    off = estimate(src, 12, stream={**stream, "expert_cache": "off"}, **settings)
    assert est.memory.cache_experts and est.merge.merge_reads > 0
    assert read == est.read_bytes < off.read_bytes


def test_guard_candidates_and_buffers_match_a_real_run(model_dirs, tmp_path):
    src = model_dirs["qwen3_moe"][1]
    settings = {"method": "ream", "guard": "layer", "num_sequences": 20, "seq_len": 32}
    out = compress(CompressConfig(model=str(src), output=str(tmp_path / "out"), experts=6,
                                  stream=StreamOptions(device="cpu", progress=False), **settings))
    record = json.loads((out / "ream_plan.json").read_text())
    est = estimate(src, 6, **settings)
    # REAP's refit, and the chosen merge's when a merge was chosen: the estimate counts both (its upper bound)
    refits = [sum(c["name"].endswith("+refit") for c in x["guard"]["candidates"]) for x in record["layers"]]
    assert est.merge.refits == 2 and all(1 <= r <= 2 for r in refits)
    judged = {len(x["guard"]["candidates"]) + 2 - r for x, r in zip(record["layers"], refits)}
    assert judged == {est.merge.judged}
    held = record["calibration"]["holdout_sequences"]
    assert est.holdout_sequences == held > 0
    assert est.memory.stores == pytest.approx(2 + 3 * held / 20)  # float32 guard buffers in a float32 model
    # the refit's float32 target of the statistics tokens, placed after them (here with them, in host RAM)
    assert est.memory.side_store_bytes == pytest.approx(est.memory.store_bytes * (20 - held) / 20, abs=1)
    assert est.memory.side_tier == "host"
    assert est.merge.alignment_pairs > 0 and "merge" in est.phases and est.merged_host_bytes > 0
    pruned = estimate(src, 6, method="reap", refit=RefitOptions("off"))
    assert pruned.merge.judged == 0 and pruned.merged_host_bytes == 0 and set(pruned.phases) == {"expert chunks"}
    assert pruned.memory.side_store_bytes == 0
    fitted = estimate(src, 6, method="reap")  # the default: REAP's plan and its refit judged
    assert fitted.merge.judged == 2 and fitted.merge.refits == 1 and fitted.memory.side_store_bytes > 0


def test_plan_command_prints_a_table_and_json(model_dirs, tmp_path):
    src = model_dirs["deepseek_v3"][1]
    r = run("plan", src, "--experts", 12, "--device", "cpu", "--no-measure")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("layers"))) + 1:]
    assert table[0].split()[:2] == ["0", "dense"] and table[1].split()[:2] == ["1-2", "moe"]
    assert "16 -> 12" in table[1]
    for word in ("peak memory", "output", "resume", "work dir", "reads", "FLOPs", "estimate", "floor"):
        assert word in r.output
    r = run("plan", src, tmp_path / "out", "--experts", 0.75, "--method", "reap", "--device", "cpu", "--no-measure",
            "--json", "--refit", "off")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["kept"] == 12 and d["guard"] == "off" and d["memory"]["store_tier"] == "host"
    assert d["disk_shortfall"] is None and d["output_bytes"] > 0 and d["seconds"] > 0
    assert [x["kind"] for x in d["layers"]] == ["dense", "moe", "moe"]


def test_plan_command_measures(model_dirs):
    r = run("plan", model_dirs["qwen3_moe"][1], "--experts", 6, "--method", "reap", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    rates = json.loads(r.output)["rates"]
    assert rates["measured"] and min(v for k, v in rates.items() if k not in ("measured", "note")) > 0


def test_plan_command_refuses_like_compress(model_dirs):
    src = model_dirs["deepseek_v3"][1]
    r = run("plan", src, "--experts", 13, "--device", "cpu")
    assert r.exit_code == 2 and "multiple of n_group" in r.output
    r = run("plan", src, src / "inside", "--experts", 12, "--device", "cpu")
    assert r.exit_code == 2 and "must not be the input directory" in r.output
    if not torch.cuda.is_available():
        r = run("plan", src, "--experts", 12, "--device", "cuda")
        assert r.exit_code == 2 and "no CUDA device" in r.output


@pytest.fixture(scope="module")
def qwen3_30b_shape(tmp_path_factory):
    """Qwen3-30B-A3B layer shapes (benchmarks/shapes.py), 4 layers, headers only: 5.6 GiB that take no disk."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import qwen3_30b_a3b

    return write_sparse_checkpoint(qwen3_30b_a3b(4), tmp_path_factory.mktemp("qwen3-30b-a3b"))


@pytest.fixture
def no_cuda(monkeypatch):
    """A planning run for a CUDA device with its budget given must not touch CUDA at all."""
    def refuse(*a, **k):
        raise AssertionError("CUDA API called")

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_qwen3_30b_at_paper_calibration_fits_a_24gb_card(qwen3_30b_shape, no_cuda):
    paper = {"num_sequences": 3072, "seq_len": 512}
    est = estimate(qwen3_30b_shape, 96, **paper, stream={"device": "cuda", "max_gpu_memory": 24 * GiB,
                                                             "max_cpu_memory": int(12.8 * GiB)})
    m = est.memory
    assert m.tokens == 3072 * 512 and m.dtype == "bfloat16"
    assert est.peak_device_bytes <= 20 * GiB
    # the two working buffers + the guard's float32 held-out buffers (6 GiB each in bf16) fit beside the experts;
    # the refit's float32 target of the statistics tokens (1.8 x 6 GiB) does not, and goes to host RAM
    assert m.store_tier == "device" and m.all_stores_bytes == pytest.approx(2.6 * 6 * GiB, rel=0.01)
    assert m.side_tier == "host" and m.side_store_bytes == pytest.approx(1.8 * 6 * GiB, rel=0.01)
    assert est.host_peak_bytes >= m.side_store_bytes
    assert m.experts_per_chunk == 128 and all(x.chunks == 1 for x in est.layers)
    assert est.output_bytes == est.input_bytes - 4 * 32 * (3 * 768 * 2048 + 2048) * 2  # experts and router rows
    assert est.work_dir_bytes == 0 and est.resume_bytes == 2 * 6 * GiB
    assert any(line.startswith("0-3 ") for line in est.lines())

    # a 16 GB card: the buffers go to host RAM where it is allowed, else to files in the work dir
    small = {"device": "cuda", "max_gpu_memory": 16 * GiB}
    host = estimate(qwen3_30b_shape, 96, **paper, stream={**small, "max_cpu_memory": 24 * GiB})
    assert host.memory.store_tier == "host" and host.peak_device_bytes <= 16 * GiB
    assert host.host_peak_bytes >= host.memory.all_stores_bytes
    disk = estimate(qwen3_30b_shape, 96, **paper, stream={**small, "max_cpu_memory": 8 * GiB})
    assert disk.memory.store_tier == "disk" and disk.work_dir_bytes == disk.memory.all_stores_bytes


def test_deepseek_v3_layer_is_chunked_within_the_budget(tmp_path, no_cuda):
    """A DeepSeek-V3 MoE layer holds 21 GiB of bf16 experts: on a 24 GB card they run in chunks, and the guard's
    alignment Grams are reserved beside the chunk."""
    cfg = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024)
    src = write_sparse_checkpoint(cfg, tmp_path / "dsv3")
    budget = 24 * GiB
    est = estimate(src, 192, stream={"device": "cuda", "max_gpu_memory": budget})
    moe = [x for x in est.layers if x.kind == "moe"]
    assert len(moe) == 1 and moe[0].expert_bytes > 20 * GiB
    assert moe[0].chunks > 1 and moe[0].experts_per_chunk * moe[0].chunks >= 256
    assert est.gram_bytes > GiB and est.peak_device_bytes <= budget
    assert est.merge.largest_group <= 9  # groups never cross DeepSeek's 8 routing groups of 32
    assert est.output_bytes == pytest.approx(est.input_bytes - 64 * moe[0].expert_bytes / 256, rel=1e-3)


def test_deepseek_v3_default_fits_24gb_at_the_paper_calibration(tmp_path, no_cuda):
    """Guarded REAM (the default) at DeepSeek-V3's shape, 256 -> 96 experts, 3072 x 512 tokens, a 24 GB card: the
    guard's 554 alignment Grams (17 GiB of float64) do not fit beside the layer, so each chunk's go to host memory
    once it is done (passes.gram_park), or to the work dir beyond the host budget, and the plan counts them there;
    on a CPU they are all counted where they are."""
    cfg = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024)
    src = write_sparse_checkpoint(cfg, tmp_path / "dsv3")
    paper = {"num_sequences": 3072, "seq_len": 512}
    card = {"device": "cuda", "max_gpu_memory": 24 * GiB}
    est = estimate(src, 96, **paper, stream={**card, "max_cpu_memory": 128 * GiB})
    assert est.merge.alignment_pairs > 500 and est.gram_bytes > 16 * GiB
    assert est.gram_host_bytes > est.gram_bytes - GiB and est.gram_device_bytes < 2 * GiB
    assert max(est.phases.values()) == est.peak_device_bytes <= 24 * GiB
    assert est.host_peak_bytes > est.gram_host_bytes + est.merged_host_bytes
    # a host budget they do not fit: the work dir takes them, and the device plan is the same
    small = estimate(src, 96, **paper, stream={**card, "max_cpu_memory": 16 * GiB})
    assert small.memory.gram_tier == "disk" and small.gram_host_bytes == 0
    assert small.memory.gram_spill_bytes == est.gram_host_bytes and small.phases == est.phases
    cpu = estimate(src, 96, **paper, stream={"device": "cpu"})
    assert cpu.gram_host_bytes == 0 and cpu.gram_device_bytes == cpu.gram_bytes


def test_kimi_k2_default_fits_24gb_at_the_paper_calibration(tmp_path, no_cuda):
    """Kimi-K2's shape (384 experts, one routing group), 384 -> 96, 3072 x 512 tokens, a 24 GB card: the guard's
    ladder reaches one group of 289 experts (1586 aligned pairs, 50 GiB of Grams). The alignment pass runs each
    centroid with as many members as fit in an expert chunk's room beside their Grams, and a merge loads a
    slice of members at a time (engine.budget), so the default fits where it needed 146 GiB before."""
    cfg = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024, n_routed_experts=384,
                           n_group=1, topk_group=1, num_experts_per_tok=8)
    src = write_sparse_checkpoint(cfg, tmp_path / "kimi")
    est = estimate(src, 96, num_sequences=3072, seq_len=512,
                   stream={"device": "cuda", "max_gpu_memory": 24 * GiB, "max_cpu_memory": 16 * GiB})
    assert est.merge.largest_group == 289 and est.merge.alignment_pairs > 1500
    assert est.merge.largest_alignment_chunk < est.merge.largest_group
    assert est.merge.largest_alignment_chunk <= est.memory.experts_per_chunk
    assert max(est.phases.values()) == est.peak_device_bytes <= 24 * GiB
    # the parked Grams would not fit the host budget: each chunk's go to work-dir files instead (mapped, unlinked)
    assert est.memory.gram_tier == "disk" and est.gram_host_bytes == 0
    assert est.memory.gram_spill_bytes > 40 * GiB and est.work_dir_bytes > est.memory.gram_spill_bytes
    assert est.memory.merged_tier == "disk" and est.memory.merged_spill_bytes > 16 * GiB  # (the guard's sets)
    assert est.host_peak_bytes < 16 * GiB  # (83 GiB when all of them stayed in host memory)
    assert "alignment Grams" in "\n".join(est.lines()) and "merged experts" in "\n".join(est.lines())
    roomy = estimate(src, 96, num_sequences=3072, seq_len=512,
                     stream={"device": "cuda", "max_gpu_memory": 24 * GiB, "max_cpu_memory": 512 * GiB})
    assert roomy.memory.gram_tier == roomy.memory.merged_tier == "host" and roomy.gram_host_bytes > 40 * GiB
    assert roomy.host_peak_bytes > est.host_peak_bytes + 40 * GiB


def test_sparse_checkpoint_takes_no_space(qwen3_30b_shape):
    layout = ModelLayout(str(qwen3_30b_shape))
    size = (qwen3_30b_shape / "model.safetensors").stat()
    assert layout.reader.total_bytes() > 4 * GiB and size.st_blocks * 512 < 16 * 1024**2


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_check_disk_space_refuses_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(100 * GiB, 88 * GiB, 12 * GiB))
    out = tmp_path / "not" / "yet" / "out"  # judged by its nearest existing parent
    with pytest.raises(ReamLiteError) as e:
        check_disk_space(out, int(61.2 * GiB))
    msg = str(e.value)
    assert msg.startswith(f"{out}: 61.2 GiB needed for the output, 12.0 GiB free on ")
    assert msg.endswith("; free space or choose another output directory") and "\n" not in msg
    check_disk_space(out, 11 * GiB)  # fits
    # the output and the work dir on one filesystem: their needs add up
    work = tmp_path / "work"
    assert disk_shortfall(out, 6 * GiB, work, 5 * GiB) is None
    msg = disk_shortfall(out, 7 * GiB, work, 6 * GiB)
    assert msg.startswith(f"{out}: 7.0 GiB needed for the output and 6.0 GiB for hidden states in {work}, 12.0 GiB")
    assert "--work-dir" in msg
    assert disk_shortfall(out, 1 * GiB, work, 0) is None  # no disk tier: the work dir needs nothing


@pytest.mark.parametrize("sequences", [256, 3072])
def test_default_budgets_fit_a_24gb_card_on_a_32gb_host(qwen3_30b_shape, monkeypatch, sequences):
    """No budget given: a 24 GB card (23.99 GiB, 23.5 free after this process's CUDA context) and 32 GB of RAM."""
    from ream_lite.engine import budget

    card, free, ram = 23.99 * GiB, 23.5 * GiB, 32 * GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(card)))
    monkeypatch.setattr(budget, "physical_ram", lambda: ram)
    est = estimate(qwen3_30b_shape, 96, num_sequences=sequences, seq_len=512, stream={"device": "cuda"})
    assert est.memory.device_budget == int(0.9 * card) and est.memory.host_budget == int(0.4 * ram)
    assert est.peak_device_bytes <= est.memory.device_budget and est.host_peak_bytes <= 0.6 * ram
    # a display holding 2 GiB: the budget shrinks to what is free, less the headroom
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free - 2 * GiB), int(card)))
    assert budget.default_gpu_budget(torch.device("cuda")) == int(free - 2 * GiB) - budget.GPU_HEADROOM


def test_resume_snapshots_follow_the_interval(qwen3_30b_shape, no_cuda):
    """4 layers: a snapshot (6 GiB at the paper's size) after layers 1-3 with --snapshot-every layer, after layer 2
    with 2, none with off (nor the disk for one); the last layer's record holds no hidden states."""
    paper = {"num_sequences": 3072, "seq_len": 512, "stream": {"device": "cuda", "max_gpu_memory": 24 * GiB}}
    for every, n in (("layer", 3), (2, 1), ("off", 0)):
        est = estimate(qwen3_30b_shape, 96, snapshot_every=every, **paper)
        assert est.snapshots == n and est.snapshot_write_bytes == n * 6 * GiB
        assert est.resume_bytes == (2 * 6 * GiB if n else 0)
    assert any("--snapshot-every off" in line for line in est.lines())
    auto = estimate(qwen3_30b_shape, 96, **paper)  # from the estimate's own seconds per layer and per snapshot
    assert 1 <= auto.snapshots <= 3 and auto.to_dict()["snapshot_write_bytes"] == auto.snapshots * 6 * GiB
