"""compress(): calibration text -> per-layer statistics -> plan -> merged weights -> written layer by layer.

Per MoE layer, on the streamer's cached MoE inputs:
  1. statistics pass (method's observer; with --no-sequential it also adds the original MoE output),
  2. the method's plan,
  3. for merged groups that align on activations, a second pass over the same cached inputs collecting cross
     Grams only for (centroid, member) pairs,
  4. merged weights, written with the layer (unchanged tensors byte for byte),
  5. sequential mode: the compressed MoE block is run to produce the next layer's input.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ream_lite import distributed, timing
from ream_lite.arch.layout import ModelLayout
from ream_lite.calib import CalibrationSet, build_calibration
from ream_lite.calib.text import load_tokenizer
from ream_lite.checkpoint import files
from ream_lite.checkpoint.lock import OutputLock
from ream_lite.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, partial_dir
from ream_lite.diskspace import check_disk_space
from ream_lite.engine.store import HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, MoEBlock, StreamOptions, token_ids
from ream_lite.errors import ReamLiteError
from ream_lite.estimate import estimate_compression
from ream_lite.guard import GUARD_MODES, HeldOutJudge, guarded_plan
from ream_lite.methods import METHODS, LayerPlan, MethodInput, MethodOptions
from ream_lite.methods.apply import needs_activation_pass
from ream_lite.methods.grouping import auto_group_size
from ream_lite.methods.stats import LayerStats, collected_gate
from ream_lite.model_card import model_card
from ream_lite.passes import (
    attention_pass, check_finite, collect_stats, compressed_loader, merge_plan, routing_counts, sequential_pass,
)
from ream_lite.refit import REFIT_MODES, RefitOptions, Refitter
from ream_lite.report import Meter, versions, write_report
from ream_lite.resume import ResumeLog, RunIdentity, SnapshotSchedule, input_fingerprint, tokens_hash
from ream_lite.stats_io import check_reusable, load_layer_stats, read_stats_info, save_layer_stats, start_stats_dir
from ream_lite.write_output import (
    compression_steps,
    copy_non_layer_tensors,
    open_writer,
    output_config,
    record_of,
    validate_output_path,
    write_layer,
    write_planned,
)

log = logging.getLogger(__name__)
MERGING_METHODS = ("ream", "hc-smoe", "m-smoe")  # methods whose merges align neurons
_TEST_DELAY = float(os.environ.get("REAM_LITE_TEST_LAYER_DELAY", "0") or 0)


@dataclass
class CompressConfig:
    model: str
    output: str
    experts: float  # experts to keep per MoE layer: an integer, or a fraction of N in (0, 1)
    method: str = "ream"
    options: MethodOptions = field(default_factory=MethodOptions)
    calib: list[str] = field(default_factory=lambda: ["builtin"])  # source specs (see ream_lite.calib.sources)
    mix: str | None = None  # domain ratios, "0:0.3:0.7" or "general=0,math=0.3,code=0.7"; None = equal shares
    packing: str = "pack"  # pack | truncate (never padded)
    chat_template: bool = False
    num_sequences: int = 256
    seq_len: int = 512
    seed: int = 0
    sequential: bool = True
    overwrite: bool = False
    drop_mtp: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    out_dtype: str = "stored"  # stored: each tensor in its input encoding (FP8 stays FP8); bf16/fp16/fp32: decoded
    quantize: str | None = None  # nf4 | fp4: Linear weights written in bitsandbytes 4-bit
    double_quant: bool = False  # bnb 4-bit with quantized statistics
    out_format: str = "auto"  # auto: as the input (safetensors, or a GGUF for a GGUF); gguf: a llama.cpp file
    gguf_type: str = "Q8_0"  # --out-format gguf: the routed experts' llama.cpp type
    tokenizer: str | None = None
    guard: str | None = None  # group | layer | off; None = "group" (REAM; other methods: when refit is not off)
    refit: RefitOptions = field(default_factory=RefitOptions)  # least-squares refit of the kept experts
    holdout: float = 0.1  # share of calibration sequences the guard judges plans on (never used for statistics)
    stream: StreamOptions = field(default_factory=StreamOptions)
    resume: bool = False  # continue the interrupted run recorded in OUT.partial
    snapshot_every: str | int = "auto"  # resume snapshots: auto | off | every N layers (resume.SnapshotSchedule)
    save_stats: str | None = None  # directory: save every MoE layer's statistics there
    from_stats: str | None = None  # directory: plan from saved statistics instead of calibrating
    command: str | None = None  # the command line, for the model card (without --resume, --overwrite, --snapshot-every)

    @property
    def guard_mode(self) -> str:
        """The guard judges plans on held-out tokens: REAM's candidates, and for every method the refit (`--refit
        auto`). Saved statistics hold no held-out tokens: --from-stats runs unguarded unless told otherwise."""
        if self.guard:
            return self.guard
        if self.method == "ream" or (self.refit.mode == "auto" and not self.from_stats):
            return "group"
        return "off"

    @property
    def refits(self) -> bool:
        """Whether a layer's plan is refit: judged on held-out tokens under the guard (auto), or always (on). With
        --guard off, auto means the paper's algorithm exactly: no refit."""
        return self.refit.mode == "on" or (self.refit.mode == "auto" and self.guard_mode != "off")


def parse_experts(text: str | float) -> float:
    """--experts as given: a positive count (96) or a fraction of the current count in (0, 1) (0.75)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf") or (value >= 1 and value != int(value)):
        raise ReamLiteError(f"--experts {text}: give an integer count of experts to keep (e.g. 96) or a fraction "
                            "of the current count between 0 and 1 (e.g. 0.75)")
    return value


def resolve_keep(layout: ModelLayout, experts: float) -> int:
    """Experts to keep per MoE layer (range checks against top-k and the routing groups are in `validate`)."""
    n = layout.router_config.num_experts
    experts = parse_experts(experts)
    return int(round(n * experts)) if experts < 1 else int(experts)


def validate(layout: ModelLayout, n_keep: int, cfg: CompressConfig) -> None:
    """Everything that can be checked before the first expensive pass."""
    layout.require_decodable()
    rc = layout.router_config
    if cfg.method not in METHODS:
        raise ReamLiteError(f"unknown method {cfg.method}; choose from {', '.join(METHODS)}")
    if not rc.top_k <= n_keep < rc.num_experts:
        raise ReamLiteError(
            f"--experts {n_keep}: must be at least top-k ({rc.top_k}) and below the current count ({rc.num_experts})"
        )
    if len({x.num_experts for x in layout.moe_layers}) > 1:
        raise ReamLiteError("MoE layers with different expert counts are not supported")
    if rc.n_group > 1:
        per = n_keep // rc.n_group
        if n_keep % rc.n_group:
            raise ReamLiteError(f"--experts {n_keep}: group-limited routing needs a multiple of n_group={rc.n_group}")
        if rc.top_k > rc.topk_group * per:
            raise ReamLiteError(
                f"--experts {n_keep}: top-k {rc.top_k} > topk_group {rc.topk_group} x {per} kept per group"
            )
        if per < 2:
            raise ReamLiteError(f"--experts {n_keep}: group-limited routing scores groups by their top-2 experts; "
                                f"keep at least 2 per group")
    if cfg.method == "ream" and cfg.options.grouping == "pseudo-prune":
        n, k = rc.num_experts // rc.n_group, n_keep // rc.n_group
        c = cfg.options.group_size or auto_group_size(n, k)
        if c * k < n or c < 1:
            raise ReamLiteError(f"--group-size {c}: {k} groups of {c} cannot hold {n} experts; use at least {-(-n // k)}")
    if layout.mtp_keys_unsupported() and not cfg.drop_mtp:
        raise ReamLiteError(f"{layout.spec.mtp_unsupported}: pass --drop-mtp to leave it out (the output then sets "
                            f"{layout.spec.detached_mtp_key} = 0)")
    for x in layout.layers:
        if x.is_mtp and not cfg.drop_mtp:
            if not x.is_moe:
                raise ReamLiteError(f"MTP layer {x.index} has no routed experts; pass --drop-mtp")
            # its input is built from these parts (LayerStreamer.mtp_inputs): a release storing others is refused
            # here, not after the decoder layers' hours of work
            spec = layout.spec
            missing = [k for k in (spec.mtp_key(x.prefix, n) for n in (spec.mtp_enorm, spec.mtp_hnorm, spec.mtp_proj))
                       if k not in layout.reader]
            if missing:
                raise ReamLiteError(f"MTP layer {x.index} lacks {missing[0]}: not an MTP block ream-lite can run; "
                                    "pass --drop-mtp to leave it out")
    if layout.gguf:
        from ream_lite.checkpoint.gguf import require_writable

        require_writable(layout.reader, cfg.method in MERGING_METHODS or cfg.refits)
    validate_output_path(layout, cfg.output)
    out = Path(cfg.output).resolve()
    for flag, d in (("--save-stats", cfg.save_stats), ("--work-dir", cfg.stream.work_dir)):
        if d is None:
            continue
        p = Path(d).resolve()
        for what, place in (("the output directory", out), ("its partial output", partial_dir(out)),
                            ("the input directory", layout.path.resolve())):
            if p == place or place in p.parents:
                raise ReamLiteError(f"{flag} {d}: must not be inside {what} ({place}); choose a directory beside it")
    if not (cfg.options.gate_logit_sim or cfg.options.gated_sim) and cfg.method == "ream":
        raise ReamLiteError("--no-gate-logit-sim and --no-gated-sim together leave REAM no similarity")
    if cfg.num_sequences < 1 or cfg.seq_len < 2:
        raise ReamLiteError("--num-sequences must be at least 1 and --seq-len at least 2")
    if cfg.guard_mode not in GUARD_MODES:
        raise ReamLiteError(f"--guard {cfg.guard_mode}: choose from {', '.join(GUARD_MODES)}")
    if cfg.refit.mode not in REFIT_MODES:
        raise ReamLiteError(f"--refit {cfg.refit.mode}: choose from {', '.join(REFIT_MODES)}")
    if cfg.refit.sweeps < 1 or not cfg.refit.ridge > 0:
        raise ReamLiteError("--refit-sweeps must be at least 1 and --refit-ridge above 0")
    if cfg.refit.mode == "on" and layout.latent:
        raise ReamLiteError("--refit on: the experts of this model run in a latent space the refit does not model; "
                            "use --refit auto (which skips it) or off")
    if cfg.refits and cfg.from_stats:
        raise ReamLiteError("the refit fits experts to calibration tokens, which saved statistics do not hold; "
                            "pass --refit off with --from-stats")
    if cfg.guard_mode != "off":
        if cfg.method != "ream" and not cfg.refits:
            raise ReamLiteError(f"--guard {cfg.guard_mode} chooses between REAM and REAP plans, and judges the refit; "
                                "it needs --method ream or --refit auto")
        if not 0 < cfg.holdout < 1:
            raise ReamLiteError(f"--holdout {cfg.holdout}: the held-out share must be between 0 and 1")
        if cfg.num_sequences < 2:
            raise ReamLiteError("the guard needs at least 2 calibration sequences (one held out); "
                                "raise --num-sequences or pass --guard off")


def calibration(layout: ModelLayout, cfg: CompressConfig) -> CalibrationSet:
    """The calibration sequences of this run: statistics sequences first, then the guard's held-out ones (the same
    share of every domain, chosen by the seed)."""
    return build_calibration(
        cfg.calib, load_tokenizer(layout.path, cfg.tokenizer), num_sequences=cfg.num_sequences, seq_len=cfg.seq_len,
        seed=cfg.seed, mix=cfg.mix, holdout=cfg.holdout if cfg.guard_mode != "off" else 0.0, packing=cfg.packing,
        chat_template=cfg.chat_template, vocab_size=int(layout.config["vocab_size"]),
    )


def calibration_record(cfg: CompressConfig, cal: CalibrationSet) -> dict:
    """What the report and the model card say about the calibration data."""
    return {"sources": cal.sources, "mix": cal.mix, "packing": cfg.packing, "chat_template": cfg.chat_template,
            "sequences": len(cal.sequences), "seq_len": cfg.seq_len, "tokens_per_domain": cal.tokens_per_domain,
            "sequences_per_domain": cal.sequences_per_domain, "holdout_sequences": cal.n_holdout}


def compress(cfg: CompressConfig, echo: Callable[[str], None] | None = None) -> Path:
    """Compress `cfg.model` into `cfg.output`; `echo` receives the plan's lines before any work (default: logged)."""
    layout = ModelLayout(cfg.model, trust_remote_code=cfg.stream.trust_remote_code)
    try:
        n_keep = resolve_keep(layout, cfg.experts)
        validate(layout, n_keep, cfg)
        # where the time goes (read, store, write, each pass: ream_lite.timing), recorded in the report; a caller
        # that enabled timing itself (benchmarks, with GPU syncs) keeps its own settings and totals
        own_timing = not timing.enabled()
        if own_timing:
            timing.enable()
        try:
            with OutputLock(cfg.output, cfg.command or "ream-lite compress"):  # (one run per output)
                return _compress(layout, cfg, n_keep, echo or (lambda line: log.info("plan: %s", line)))
        finally:
            if own_timing:
                timing.disable()
    finally:
        layout.close()


def run_identity(layout: ModelLayout, cfg: CompressConfig, streamer: LayerStreamer, seqs: list[torch.Tensor]) -> RunIdentity:
    """The settings that decide the output's bytes: the compression settings, and how the numbers are computed
    (device type, dtype, expert chunking and token batching change float rounding). Budgets, tiers, the work dir,
    progress bars and when resume snapshots are taken do not (a resume may choose another interval)."""
    skip = ("model", "output", "overwrite", "resume", "stream", "command", "snapshot_every")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    settings.update(device_type=streamer.device.type, dtype=str(streamer.dtype),
                    experts_per_chunk=streamer.plan.experts_per_chunk, tokens_per_batch=cfg.stream.tokens_per_batch,
                    **{k: v for k, v in versions().items() if k != "python_version"})
    return RunIdentity(json.loads(json.dumps(settings, default=str)), input_fingerprint(layout), tokens_hash(seqs))


def resumable_run(cfg: CompressConfig, identity: RunIdentity, streamer: LayerStreamer) -> dict | None:
    """The manifest of the interrupted run in OUT.partial that this run continues (--resume), or None to start
    afresh; refuses to silently discard an interrupted run, or to continue one made with other settings.
    The expert chunk size changes rounding, so a resumed run takes the interrupted run's when its budget allows
    (the default GPU budget follows the memory free at start, which the user does not choose)."""
    out = Path(cfg.output)
    manifest = ResumeLog(partial_dir(out)).load() if cfg.resume or not cfg.overwrite else None
    if manifest is not None and not cfg.resume:
        raise ReamLiteError(
            f"{partial_dir(out)} holds an interrupted run ({manifest['steps_done']} of {manifest['total_steps']} "
            "layers done); pass --resume to continue it or --overwrite to start over"
        )
    if manifest is not None:
        chunk = manifest.get("settings", {}).get("experts_per_chunk")
        if isinstance(chunk, int) and chunk != streamer.plan.experts_per_chunk:
            if chunk > streamer.plan.experts_per_chunk:
                raise ReamLiteError(
                    f"cannot resume {partial_dir(out)}: the interrupted run ran experts in chunks of {chunk}, this "
                    f"run's memory budget allows {streamer.plan.experts_per_chunk}; give --max-gpu-memory (or "
                    "--batch-tokens) as the first run had it")
            streamer.plan.experts_per_chunk = chunk
            identity.settings["experts_per_chunk"] = chunk
        why = identity.mismatch(manifest)
        if why:
            raise ReamLiteError(f"cannot resume {partial_dir(out)}: {why}; rerun with the original settings, "
                                "or pass --overwrite to start over")
        log.warning("resuming after %d of %d layers", manifest["steps_done"], manifest["total_steps"])
    elif cfg.resume:
        log.warning("%s: no interrupted run to resume; starting from the first layer", out)
    return manifest


def _compress(layout: ModelLayout, cfg: CompressConfig, n_keep: int, echo: Callable[[str], None]) -> Path:
    schedule = SnapshotSchedule(cfg.snapshot_every)  # (checks --snapshot-every before any work)
    if cfg.resume and not cfg.overwrite and Path(cfg.output).exists() and not partial_dir(Path(cfg.output)).exists():
        log.warning("%s is complete; nothing to resume", cfg.output)
        return Path(cfg.output)
    if cfg.stream.work_dir is None:
        cfg.stream.work_dir = str(Path(cfg.output).resolve().parent)
    if cfg.from_stats:
        return compress_from_stats(layout, cfg, n_keep)
    method = METHODS[cfg.method]
    with timing.phase("calibration"):
        cal = calibration(layout, cfg)
    seqs, n_holdout = cal.sequences, cal.n_holdout
    # the plan, printed before any work; its memory plan is the one the streamer follows
    est = estimate_compression(layout, cfg, n_keep, sequences=len(seqs), holdout_sequences=n_holdout,
                               tokens=sum(len(s) for s in seqs), measure=False)
    for line in est.lines():
        echo(line)
    streamer = LayerStreamer(layout, cfg.stream)
    streamer.plan = est.memory
    streamer.output_format = est.output_format
    world = distributed.current()
    world.broadcast(("plan", streamer.plan, streamer.output_format))  # (rank 0's chunks, batches, output)
    rc = layout.router_config
    identity = run_identity(layout, cfg, streamer, seqs)
    manifest = resumable_run(cfg, identity, streamer)
    # what the report and the card name: the first run's (a resume may spell the model path or flags otherwise)
    first_run = manifest["first_run"] if manifest else {"command": cfg.command, "model": str(layout.path)}
    written = manifest["writer"]["bytes_written"] if manifest else 0  # (a resumed run needs only the rest)
    check_disk_space(cfg.output, max(0, est.output_disk_bytes - written) + est.resume_bytes, cfg.stream.work_dir,
                     est.work_dir_bytes)
    writer = open_writer(layout, cfg.output, n_keep, streamer.output_format, max_shard_bytes=cfg.max_shard_bytes,
                         overwrite=cfg.overwrite, resume=manifest["writer"] if manifest else None,
                         record=gguf_record(cfg, layout, n_keep))
    on_stats = None  # called with every MoE layer's statistics (--save-stats)
    if cfg.save_stats:
        stats_run = start_stats_dir(cfg.save_stats, {
            "inputs": identity.inputs, "calibration_tokens": identity.calibration, "sequential": cfg.sequential,
            "saliency_gate": collected_gate(cfg.options.saliency_gate), "dense": method.needs_dense(cfg.options),
            "gram": method.needs_gram(cfg.options), "seed": cfg.seed, "calibration": calibration_record(cfg, cal)},
            resume=manifest is not None)
        on_stats = lambda stats: save_layer_stats(cfg.save_stats, stats, stats_run)  # noqa: E731
    resume_log = ResumeLog(writer.tmp_dir, continues=manifest)
    steps = compression_steps(layout, cfg.drop_mtp)
    n_dec = len(layout.decoder_layers)
    layers: list[dict] = [] if manifest is None else manifest["layers"]
    done = 0 if manifest is None else manifest["steps_done"]
    run = Meter()  # (its device peak is the max of the layers': each layer's Meter resets it)
    h = out = None
    try:
        if manifest is None:
            streamer.read_ahead(streamer.layer_after(-1))  # (layer 0 comes in while the other tensors are copied)
            copy_non_layer_tensors(writer, layout, cfg.drop_mtp)
            h = streamer.embed(seqs)
        else:
            h = resumed_hidden(streamer, resume_log, manifest)
            if h is not None:  # (the tokens of its rows: hash-routed layers choose experts by them)
                h.token_ids = token_ids(seqs)
        bar = tqdm(total=len(steps), initial=done, desc=f"{cfg.method} {rc.num_experts}->{n_keep}",
                   disable=not cfg.stream.progress)
        for step in range(done, len(steps)):
            info = steps[step]
            if step >= n_dec:  # an MTP layer: fed as the model feeds it at inference (see ArchSpec)
                j = step - n_dec  # MTP layer j sees token t + j + 1 at position t
                prev_norm = layout.spec.final_norm_key if j == 0 else \
                    layout.spec.mtp_key(steps[step - 1].prefix, layout.spec.mtp_head_norm)
                x = streamer.mtp_inputs(info.index, [s[j:] for s in seqs], h, prev_norm)
                h.close()
                h = x
                if out is not None:
                    out.close()
                out = None
            if out is None or out.lengths != h.lengths:
                out = streamer.new_store(h.lengths)
            record = compress_layer(streamer, writer, info.index, h, out, method, n_keep, cfg, n_holdout,
                                    on_stats=on_stats)
            if record is not None:
                layers.append(record)
            if _TEST_DELAY:  # tests: widen the window in which a kill lands between writing and recording a layer
                time.sleep(_TEST_DELAY)
            h, out = out, h
            if schedule.due(step + 1, len(steps)):
                last = step + 1 == len(steps)  # then no layer reads the hidden states: the record is small
                t0 = time.monotonic()
                with timing.phase("snapshot"):
                    resume_log.commit(identity, step + 1, len(steps), writer.state(), layers, None if last else h,
                                      first_run)
                schedule.took(time.monotonic() - t0)
            bar.update()
        bar.close()
        close_stores(h, out)
        log.info("resume: %d hidden-state snapshots, %.1f MiB written to %s", resume_log.snapshots,
                 resume_log.bytes_written / 2**20, resume_log.dir)
        ranks = None
        if world.size > 1:  # every rank's wall time, peak memory and reads, for the report
            world.broadcast(("summary",))
            ranks = world.gather(world.summary(layout.reader.bytes_read))
        write_side_files(writer.tmp_dir, layout, cfg, n_keep, calibration_record(cfg, cal), layers, run, writer,
                         first_run, est, ranks)
        # the resume record goes last: a kill or an error before the output is in place can still be resumed
        return writer.finish(output_config(layout, n_keep, cfg.drop_mtp, writer.output), source_dir=layout.path,
                             before_publish=resume_log.remove)
    except BaseException as e:
        close_stores(h, out)
        if isinstance(e, files.DiskFull):
            e = disk_full_advice(e, est, writer, cfg)
        m = resume_log.load()
        if m is None:  # nothing recorded yet: nothing worth keeping
            writer.abort()
            if isinstance(e, files.DiskFull):
                raise ReamLiteError(f"{e}; free space, then run the command again") from None
            raise
        writer.close_files()
        how = f"{m['steps_done']} of {m['total_steps']} layers are done in {writer.tmp_dir}; " \
              "run the same command with --resume to continue"
        if isinstance(e, files.DiskFull):
            raise ReamLiteError(f"{e}; free space, then run the same command with --resume: {m['steps_done']} of "
                                f"{m['total_steps']} layers are done in {writer.tmp_dir}") from None
        if isinstance(e, KeyboardInterrupt):
            raise ReamLiteError(f"interrupted: {how}") from None
        if isinstance(e, ReamLiteError):
            raise ReamLiteError(f"{e} ({how})") from None
        log.error("stopped: %s", how)
        raise


def gguf_record(cfg: CompressConfig, layout: ModelLayout, n_keep: int) -> dict[str, str | int]:
    """What a GGUF output's metadata records of the compression (`ream_lite.*` keys; the report says the rest)."""
    return record_of(cfg.method, cfg.guard_mode, layout, n_keep)


def disk_full_advice(e: files.DiskFull, est, writer: CheckpointWriter, cfg: CompressConfig) -> files.DiskFull:
    """`e` with how much more the run needs on that disk: the rest of the output and its resume snapshots when
    the full disk holds the output, the spilled hidden states when it holds the work dir."""
    if e.what.startswith("hidden states"):  # (HiddenStateStore's spill file)
        more, what = est.work_dir_bytes, "the hidden states (--work-dir)"
    else:
        more, what = max(0, est.output_disk_bytes - writer.bytes_written) + est.resume_bytes, "the output"
    e.args = (f"{e.args[0]}; about {more / 2**30:.2f} GiB more are needed for {what}",)
    return e


def resumed_hidden(streamer: LayerStreamer, resume_log: ResumeLog, manifest: dict) -> HiddenStateStore | None:
    """The hidden states of the snapshot a resumed run starts from; None when every step is done."""
    path = resume_log.hidden_path(manifest)
    if path is None:
        return None
    h = streamer.new_store(manifest["hidden"]["lengths"])
    h.load(path, manifest["hidden"]["checksum"])
    return h


def close_stores(*stores: HiddenStateStore | None) -> None:
    for store in stores:
        if store is not None:
            store.close()


def time_split(wall: float, est=None) -> dict:
    """Where `wall` seconds of this process went, by part (ream_lite.timing's totals: read, store, write, snapshot,
    and each pass's compute; `other`: what no part claims) against the plan's floor (each byte read once and the
    same FLOPs, at the rates the plan used: measured by `ream-lite plan`, assumed here unless it measured)."""
    parts = {k: round(v, 3) for k, v in timing.totals().items() if v > 0}
    out = {"wall_seconds": round(wall, 3), "parts_seconds": parts,
           "other_seconds": round(max(0.0, wall - sum(parts.values())), 3),
           # (unsynchronized on a GPU, a queued kernel is charged to whichever part next waits for the device)
           "gpu_synchronized": timing.synchronized()}
    if est is not None and est.floor_seconds > 0:
        out.update(floor_seconds=round(est.floor_seconds, 3), floor_rates="measured" if est.rates.measured else
                   "assumed", wall_over_floor=round(wall / est.floor_seconds, 2))
    return out


def time_line(split: dict) -> str:
    """The closing summary's line of `time_split`: the largest parts first."""
    parts = sorted(split["parts_seconds"].items(), key=lambda kv: -kv[1])
    line = f"time {split['wall_seconds']:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts[:8])
    if split.get("floor_rates") == "measured":
        line += f"; {split['wall_over_floor']:.2f}x the plan's floor of {split['floor_seconds']:.1f} s"
    elif "floor_seconds" in split:  # (a floor at assumed rates says nothing of this machine)
        line += "; the floor is not measured here (`ream-lite plan` measures this machine's rates)"
    return line


def build_report(layout: ModelLayout, cfg: CompressConfig, n_keep: int, calibration: dict, layers: list[dict],
                 run: Meter, writer: CheckpointWriter, first_run: dict, est=None, ranks: list[dict] | None = None
                 ) -> dict:
    """Everything about the run (see ream_lite.report); ream_plan.json is its deterministic part. `ranks`: each
    rank's summary under torchrun (`distributed.World.summary`)."""
    totals = run.read()
    if ranks:  # (the chunk and batch settings that make the numbers independent of the world size)
        totals["distributed"] = {"world_size": len(ranks), "ranks": ranks,
                                 "experts_per_chunk": est.memory.experts_per_chunk if est else None,
                                 "tokens_per_batch": cfg.stream.tokens_per_batch}
    if timing.enabled():
        totals["time"] = time_split(timing.elapsed(), est)
        log.info("%s", time_line(totals["time"]))
    peaks = [L["peak_device_bytes"] for L in layers if L.get("peak_device_bytes") is not None]
    totals["peak_device_bytes"] = max(peaks) if peaks else None  # each layer's Meter resets the CUDA peak
    totals.update(size_before_bytes=layout.reader.total_bytes(), size_after_bytes=writer.tensor_bytes,
                  bytes_read=layout.reader.bytes_read, bytes_written=writer.bytes_written)
    return {
        **versions(),
        **({"command": first_run["command"]} if first_run.get("command") else {}),
        "model": first_run["model"],
        **({"multimodal": layout.multimodal} if layout.multimodal else {}),  # (its text model was compressed)
        "method": cfg.method,
        "experts": {"before": layout.router_config.num_experts, "after": n_keep},
        "options": asdict(cfg.options),
        "sequential": cfg.sequential,
        "drop_mtp": cfg.drop_mtp,
        "output": {"out_dtype": cfg.out_dtype, "quantize": cfg.quantize, "double_quant": cfg.double_quant,
                   "format": writer.output.describe,
                   **({"out_format": "gguf", "gguf_type": cfg.gguf_type} if cfg.out_format == "gguf" else {})},
        "seed": cfg.seed,
        "guard": cfg.guard_mode,
        "calibration": calibration,
        "totals": totals,
        "layers": layers,
    }


def write_side_files(d: Path, layout: ModelLayout, cfg: CompressConfig, n_keep: int, calibration: dict,
                     layers: list[dict], run: Meter, writer: CheckpointWriter, first_run: dict, est=None,
                     ranks: list[dict] | None = None) -> None:
    """ream_report.json, ream_plan.json, the plots and the model card, into the partial output directory `d`."""
    report = build_report(layout, cfg, n_keep, calibration, layers, run, writer, first_run, est, ranks)
    for note in write_report(d, report):
        log.warning("%s", note)
    files.write_file(d / "README.md", model_card(report, output_name=Path(cfg.output).name), "the model card")


def compress_from_stats(layout: ModelLayout, cfg: CompressConfig, n_keep: int) -> Path:
    """Plans from statistics saved by an earlier `--no-sequential --save-stats` run: no calibration pass at all.
    Only plans whose merges need no activations are possible (pruning, or merging aligned on weights)."""
    run = Meter()
    method = METHODS[cfg.method]
    info = read_stats_info(cfg.from_stats)
    cfg = replace(cfg, sequential=bool(info.get("sequential", True)))  # what the statistics were, for the report
    check_reusable(info, input_fingerprint(layout), cfg.options.saliency_gate, method.needs_dense(cfg.options),
                   method.needs_gram(cfg.options))
    if cfg.guard_mode != "off":
        raise ReamLiteError("the guard judges plans on held-out calibration tokens, which saved statistics do not "
                            "hold; pass --guard off with --from-stats")
    n_group = layout.router_config.n_group
    plans: dict[int, LayerPlan] = {}
    for x in compression_steps(layout, cfg.drop_mtp):
        if not x.is_moe:
            continue
        stats = load_layer_stats(cfg.from_stats, x.index, x.num_experts, info["run"])
        check_finite(stats)
        plan = method.plan(MethodInput(stats, n_keep, n_group, cfg.options, cfg.seed))
        plan.validate()
        if needs_activation_pass(plan):
            raise ReamLiteError(f"--method {cfg.method} --align {plan.align} aligns neurons on activations, which "
                                "saved statistics do not hold; pass --align weight or --align none")
        plans[x.index] = plan
    est = estimate_compression(layout, cfg, n_keep, measure=False)
    check_disk_space(cfg.output, est.output_disk_bytes)
    writer = open_writer(layout, cfg.output, n_keep, est.output_format, max_shard_bytes=cfg.max_shard_bytes,
                         overwrite=cfg.overwrite, record=gguf_record(cfg, layout, n_keep))
    calibration = {**info.get("calibration", {}), "from_stats": str(cfg.from_stats)}

    def side_files(d: Path) -> None:
        write_side_files(d, layout, cfg, n_keep, calibration, [p.to_json() for _, p in sorted(plans.items())], run,
                         writer, {"command": cfg.command, "model": str(layout.path)})

    return write_planned(layout, plans, n_keep, cfg.drop_mtp, writer, torch.device(cfg.stream.device),
                         cfg.stream.progress, side_files)


def compress_layer(
    streamer: LayerStreamer, writer: CheckpointWriter, index: int, h: HiddenStateStore, out: HiddenStateStore,
    method, n_keep: int, cfg: CompressConfig, n_holdout: int, on_stats: Callable[[LayerStats], None] | None = None,
) -> dict | None:
    """Layer `index` from h into out, compressed if MoE, and written; returns the MoE layer's record."""
    meter = Meter(streamer.device)
    with timing.phase("attention"):
        block = attention_pass(streamer, index, h, out)
    plan, merged = None, {}
    if block is not None:  # every pass over the layer's experts from one read of them, when they fit the plan
        with streamer.layer_experts(index):
            plan, merged = compress_moe_layer(streamer, block, streamer.moe_input(h), out, method, n_keep, cfg,
                                              n_holdout, on_stats)
            # the kept experts go to the output from the cache where it holds their stored bytes (no re-read)
            write_layer(writer, streamer.layout, index, plan, merged, streamer.stored_experts(index))
    else:
        write_layer(writer, streamer.layout, index, plan, merged)
    if plan is None:
        return None
    return {**plan.to_json(), **meter.read(), "tokens": plan.tokens}


def compress_moe_layer(
    streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, out: HiddenStateStore, method, n_keep: int,
    cfg: CompressConfig, n_holdout: int = 0, on_stats: Callable[[LayerStats], None] | None = None,
) -> tuple[LayerPlan, dict]:
    """Statistics -> plan (guarded: judged on the last `n_holdout` sequences) -> merged experts for one MoE layer;
    adds the (compressed, in sequential mode) MoE output into `out`."""
    n = len(h.lengths)
    split = n - n_holdout
    h_stats = h.view(0, split) if n_holdout else h
    out_stats = None if cfg.sequential else (out.view(0, split) if n_holdout else out)
    # the refit's target, the original routed output of the statistics tokens, is added up by the same pass
    # (a latent MoE is not refit: its experts' outputs reach the layer through a projection the fit does not model)
    refitter = Refitter(streamer, block, h_stats, cfg.refit) if cfg.refits and block.latent_in is None else None
    try:
        with timing.phase("stats"):
            stats = collect_stats(streamer, block, h_stats, method, cfg.options, out_stats,
                                  also=refitter.observer() if refitter else None)
        check_finite(stats)
        if on_stats is not None:
            on_stats(stats)
        if cfg.guard_mode == "off":
            plan = method.plan(MethodInput(stats, n_keep, block.router_cfg.n_group, cfg.options, cfg.seed))
            plan.validate()
            merged = merge_plan(streamer, block, h_stats, plan, split=True)
            if refitter is not None:  # --refit on without held-out tokens: fitted, not judged
                merged, plan.refit = refitter.fit(plan, merged, compressed_loader(streamer, plan, merged))
                plan.refit["used"] = True
        else:
            h_hold = h.view(split, n)
            if not cfg.sequential:  # the original output of the held-out sequences too
                streamer.run_moe(block, h_hold, out.view(split, n))
            with timing.phase("guard"):  # (its alignment pass, assignments and merges are timed as such)
                judge = HeldOutJudge(streamer, block, h_hold)
                try:
                    plan, merged = guarded_plan(streamer, block, h_stats, judge, stats, n_keep, cfg.options,
                                                cfg.seed, cfg.guard_mode, cfg.method, refitter)
                finally:
                    judge.close()
    finally:
        if refitter is not None:
            refitter.close()
    compressed = block.restricted(plan.kept)
    stats_tokens = h_stats.total_tokens
    plan.tokens = stats_tokens
    if cfg.sequential:  # the compressed block makes the next layer's input; its routing is counted on the way
        with timing.phase("sequential"):
            plan.frequency_after = sequential_pass(streamer, compressed, h, out, plan, merged, stats_tokens)
    else:
        plan.frequency_after = routing_counts(streamer, compressed, h, stats_tokens)
    return plan, merged
