"""REAP the way the reference implementation does it, for side-by-side measurements (scale.py --reference-style):

    python benchmarks/reference_style.py MODEL OUT --experts K [--calib builtin] [--num-sequences N] [--seq-len L]
                                         [--batch-size 1] [--device cpu|cuda] [--seed 0] [--result RESULT.json]

What the reference (CerebrasResearch/reap, observer.py and prune.py) does, re-created here from its description,
not its code:
  1. the whole model is loaded with transformers `from_pretrained` onto the device (every layer's weights at once);
  2. a forward hook on every MoE block runs every expert on every token of the batch into a float32
     [experts, tokens, hidden] buffer, and accumulates REAP saliency (router weight x activation norm, averaged
     over the tokens routed to the expert) and routing frequency;
  3. the calibration batches are run through the full model (one forward per batch, all layers);
  4. per layer the experts with the highest saliency are kept, the rest removed from the modules in memory;
  5. the model is written with `save_pretrained`.
The calibration sequences are built by ream-lite's own sampler with the same arguments, so both runs see the same
tokens; routing uses ream-lite's router code (the family's top-k rule), so the statistics are the same kind.
Writes RESULT.json with wall time per phase, peak host RSS and peak GPU memory (benchmarks/measure.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import GpuSampler, host_peak  # noqa: E402

from ream_lite.arch.layout import ModelLayout  # noqa: E402
from ream_lite.engine.router import route  # noqa: E402
from ream_lite.pipeline import CompressConfig, calibration, resolve_keep  # noqa: E402


class ReapObserver:
    """Hooks on every MoE block of a loaded model; REAP saliency and frequency per layer."""

    def __init__(self, model, layout: ModelLayout):
        self.rc = layout.router_config
        self.spec = layout.spec
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.hooks = []
        for i, layer in enumerate(model.model.layers):
            block = getattr(layer, self.spec.moe_attr, None)
            if block is not None and hasattr(block, "experts") and hasattr(block, "gate"):
                self.hooks.append(block.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        @torch.no_grad()
        def fn(block, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            gate = block.gate
            bias = getattr(gate, "e_score_correction_bias", None)
            routing = route(x, gate.weight, self.rc, bias)
            ex = block.experts
            n, inter = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1] // 2
            # every expert on every token, in float32, as the reference does
            acts = torch.zeros((n, *x.shape), device=x.device, dtype=torch.float32)
            for e in range(n):
                gu = torch.nn.functional.linear(x, ex.gate_up_proj[e])
                acts[e] = torch.nn.functional.linear(ex.act_fn(gu[:, :inter]) * gu[:, inter:], ex.down_proj[e]).float()
            st = self.state.setdefault(i, {"reap_sum": torch.zeros(n, dtype=torch.float64, device=x.device),
                                           "count": torch.zeros(n, dtype=torch.int64, device=x.device)})
            norms = acts.norm(dim=-1)  # [n, T]
            tok = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(routing.indices)
            # the gate REAP weighs by: the full-softmax probability (softmax routers), the applied weight (sigmoid)
            sigmoid = self.rc.kind == "sigmoid_grouped_topk"
            gate_w = routing.weights if sigmoid else routing.scores.gather(1, routing.indices)
            contrib = gate_w.double() * norms[routing.indices, tok].double()
            st["reap_sum"].index_add_(0, routing.indices.reshape(-1), contrib.reshape(-1))
            st["count"].index_add_(0, routing.indices.reshape(-1), torch.ones_like(routing.indices.reshape(-1)))
            del acts

        return fn

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def saliency(self, i: int) -> torch.Tensor:
        st = self.state[i]
        return (st["reap_sum"] / st["count"].clamp(min=1)).cpu()


@torch.no_grad()
def prune_in_place(model, observer: ReapObserver, layout: ModelLayout, n_keep: int) -> dict[int, list[int]]:
    """Keep the `n_keep` most salient experts of every hooked layer in the loaded modules; returns the kept ids."""
    kept_by_layer = {}
    for i in observer.state:
        block = getattr(model.model.layers[i], layout.spec.moe_attr)
        kept = sorted(torch.argsort(observer.saliency(i), descending=True, stable=True)[:n_keep].tolist())
        idx = torch.tensor(kept, device=block.gate.weight.device)
        block.gate.weight = torch.nn.Parameter(block.gate.weight[idx].clone())
        if getattr(block.gate, "e_score_correction_bias", None) is not None:
            block.gate.e_score_correction_bias = block.gate.e_score_correction_bias[idx].clone()
        for name in ("gate_up_proj", "down_proj"):
            setattr(block.experts, name, torch.nn.Parameter(getattr(block.experts, name)[idx].clone()))
        for obj in (block.gate, block.experts, block):
            for attr in ("num_experts", "n_routed_experts"):
                if hasattr(obj, attr):
                    setattr(obj, attr, n_keep)
        kept_by_layer[i] = kept
    for key in layout.spec.num_experts_keys:
        if hasattr(model.config, key):
            setattr(model.config, key, n_keep)
    return kept_by_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--experts", required=True)
    ap.add_argument("--calib", action="append", default=None)
    ap.add_argument("--num-sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per forward (the reference: 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    sampler = GpuSampler() if args.device.startswith("cuda") else None
    sync = torch.cuda.synchronize if sampler else (lambda: None)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()

    layout = ModelLayout(args.model)
    cfg = CompressConfig(model=args.model, output=args.out, experts=float(args.experts), method="reap",
                         calib=args.calib or ["builtin"], num_sequences=args.num_sequences, seq_len=args.seq_len,
                         seed=args.seed, guard="off")
    n_keep = resolve_keep(layout, cfg.experts)
    t = time.perf_counter()
    seqs = calibration(layout, cfg).sequences
    phases["calibration"] = time.perf_counter() - t

    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    try:  # straight onto the GPU where accelerate is installed (as the reference does), else load then move
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=args.device)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device)
    model.eval()
    sync()
    phases["load"] = time.perf_counter() - t
    observer = ReapObserver(model, layout)

    t = time.perf_counter()
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    for group in by_len.values():
        for a in range(0, len(group), args.batch_size):
            ids = torch.stack(group[a : a + args.batch_size]).to(args.device)
            model.model(input_ids=ids, use_cache=False)  # the decoder only: the head's logits are not needed
    sync()
    phases["forward_and_hooks"] = time.perf_counter() - t
    observer.close()

    t = time.perf_counter()
    kept = prune_in_place(model, observer, layout, n_keep)
    sync()
    phases["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(args.out)
    phases["save"] = time.perf_counter() - t
    result = {"wall_seconds": time.perf_counter() - t_all, "phases": phases, "host_peak_bytes": host_peak(),
              "kept": {str(k): v for k, v in kept.items()}, "tokens": sum(len(s) for s in seqs)}
    if sampler is not None:
        result.update(sampler.stop())
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kept"}))


if __name__ == "__main__":
    main()
