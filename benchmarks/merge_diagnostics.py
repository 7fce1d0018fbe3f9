"""Why does merging lose (or win) against pruning on a model? Measurements per layer and per merged group.

    python benchmarks/merge_diagnostics.py [--testbed ../shared/testbed] [--keep 12] [--group-sizes 2 4 8]

On the original model's MoE inputs of every layer (calibration tokens, non-sequential so that every plan sees the
same inputs), for REAP and for REAM at each group size:
  * layer error e = sum ||y - y_hat||^2 / sum ||y||^2 of the routed-experts output (y original, y_hat compressed,
    with the family's router restricted to the kept rows);
and for every merged group of REAM (centroid c, members j):
  * weight cosine between the centroid and each member before alignment (flattened gate/up/down),
  * centroid damage: ||E_merged(x) - E_c(x)|| / ||E_c(x)|| on the tokens routed to c,
  * member recovery: ||E_merged(x) - E_j(x)|| / ||E_j(x)|| on the tokens routed to j (1.0 = no better than
    dropping the member's output altogether).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.experts import ExpertWeights, expert_output, load_experts
from ream_lite.engine.router import route
from ream_lite.engine.store import HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, StreamOptions
from ream_lite.methods import METHODS, MethodInput, MethodOptions
from ream_lite.passes import collect_stats, compressed_loader, merge_plan
from ream_lite.pipeline import CompressConfig, calibration


def routed_output(streamer: LayerStreamer, block, moe_in: HiddenStateStore, experts=None) -> HiddenStateStore:
    y = HiddenStateStore(moe_in.lengths, moe_in.hidden, torch.float32, "host")
    y.buf.zero_()
    shared, block.shared = block.shared, None  # routed experts only
    streamer.run_moe(block, moe_in, y, experts=experts)
    block.shared = shared
    return y


def relative_error(y: HiddenStateStore, y_hat: HiddenStateStore) -> float:
    return float(((y.buf - y_hat.buf) ** 2).sum() / (y.buf**2).sum())


def group_diagnostics(streamer, layer, plan, merged, x, stats_routing) -> list[dict]:
    rows = []
    for c, members in plan.merged_groups().items():
        w = load_experts(streamer.layout, layer, members, torch.float32, "cpu")
        g, u, d = merged[c]
        m = ExpertWeights([c], g[None], u[None], d[None])
        idx = stats_routing.indices
        for j, e in enumerate(members):
            tok = (idx == e).any(-1).nonzero().squeeze(-1)
            if tok.numel() == 0:
                continue
            orig = expert_output(w, j, x[tok], streamer.layer_act(layer))
            got = expert_output(m, 0, x[tok], streamer.layer_act(layer))
            err = float((got - orig).norm() / orig.norm())
            flat_c = torch.cat([w.gate[0].flatten(), w.up[0].flatten(), w.down[0].flatten()])
            flat_e = torch.cat([w.gate[j].flatten(), w.up[j].flatten(), w.down[j].flatten()])
            rows.append({"layer": layer, "centroid": c, "expert": e, "is_centroid": j == 0,
                         "weight": plan.weights[c][j], "err": err,
                         "cos_raw": float(torch.nn.functional.cosine_similarity(flat_c, flat_e, dim=0))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(Path(__file__).resolve().parents[2] / "shared" / "testbed"))
    ap.add_argument("--model", default=None, help="model directory (default: the testbed's)")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--keep", type=int, default=12)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--num-sequences", type=int, default=96)
    args = ap.parse_args()
    tb = Path(args.testbed)
    model = args.model or str(tb / "tiny-qwen3-moe")
    calib = args.calib or str(tb / "data" / "calib.jsonl")
    cfg = CompressConfig(model=model, output="unused", experts=args.keep, calib=calib, guard="off",
                         num_sequences=args.num_sequences, seq_len=256, stream=StreamOptions(progress=False))
    layout = ModelLayout(model)
    seqs = calibration(layout, cfg).sequences
    s = LayerStreamer(layout, cfg.stream)
    s.make_plan(sum(len(q) for q in seqs))
    h = s.embed(seqs)
    nxt = s.new_store(h.lengths)
    variants = [("reap", MethodOptions())] + [(f"ream-C{c}", MethodOptions(group_size=c)) for c in args.group_sizes]
    variants.append(("ream-C4-twice", MethodOptions(group_size=4, saliency_gate="twice")))
    errors = {v: [] for v, _ in variants}
    groups = {v: [] for v, _ in variants if v != "reap"}
    for info in layout.decoder_layers:
        block = s.attention_phase(info.index, h, nxt)
        if block is None:
            h, nxt = nxt, h
            continue
        rc = block.router_cfg
        stats = collect_stats(s, block, h, METHODS["ream"], MethodOptions())
        y = routed_output(s, block, h)
        x = h.buf.float()
        routing = route(x, block.router_weight.float(), rc, block.router_bias)
        for name, opts in variants:
            method = METHODS["reap" if name == "reap" else "ream"]
            plan = method.plan(MethodInput(stats, args.keep, rc.n_group, opts, 0))
            merged = merge_plan(s, block, h, plan)
            y_hat = routed_output(s, block.restricted(plan.kept), h, compressed_loader(s, plan, merged))
            errors[name].append(relative_error(y, y_hat))
            if name != "reap":
                groups[name] += group_diagnostics(s, info.index, plan, merged, x, routing)
            y_hat.close()
        s.run_moe(block, h, nxt)  # propagate the original model
        y.close()
        h, nxt = nxt, h
    print(f"{Path(model).name}: {layout.router_config.num_experts} -> {args.keep} experts, "
          f"{sum(len(q) for q in seqs):,} calibration tokens, original inputs at every layer\n")
    print("layer error e = sum||y - y_hat||^2 / sum||y||^2 of the routed output, per layer")
    print(f"{'plan':<15}" + "".join(f"{'L' + str(i):>8}" for i in range(len(errors['reap']))) + f"{'mean':>8}")
    for name, es in errors.items():
        print(f"{name:<15}" + "".join(f"{e:>8.3f}" for e in es) + f"{statistics.mean(es):>8.3f}")
    print("\nmerged groups: output error of the merged expert relative to the original expert, on that expert's "
          "own routed tokens")
    for name, rows in groups.items():
        cent = [r for r in rows if r["is_centroid"]]
        mem = [r for r in rows if not r["is_centroid"]]
        print(f"{name:<15} centroids: damage {statistics.mean(r['err'] for r in cent):.3f} "
              f"(weight {statistics.mean(r['weight'] for r in cent):.2f}) | members: error "
              f"{statistics.mean(r['err'] for r in mem):.3f} (1.0 = as if dropped), weight cosine to centroid "
              f"{statistics.mean(r['cos_raw'] for r in mem):+.3f}, n={len(mem)}")


if __name__ == "__main__":
    main()
