"""The `ream-lite` command. Thin: parses options, calls the library, prints. User errors -> one line, exit 2."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys

# Expert chunks of different sizes come and go every layer; with fixed-size segments the CUDA caching allocator
# keeps fragments of earlier chunks reserved, which the memory plan cannot see (measured on a DeepSeek-V3 layer:
# 22.1 GiB reserved for 20.5 GiB allocated). Read when CUDA initialises, so set before torch is used; the user's own
# setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import click  # noqa: E402
import torch  # noqa: E402

from ream_lite import __version__  # noqa: E402
from ream_lite.engine.budget import EXPERT_CACHE_MODES, parse_bytes, require_device  # noqa: E402
from ream_lite.engine.streamer import StreamOptions  # noqa: E402
from ream_lite.errors import ReamLiteError  # noqa: E402

METHOD_NAMES = ("ream", "reap", "frequency", "ean", "random", "hc-smoe", "m-smoe")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _user_errors(fn):
    """Turn ReamLiteError (and Ctrl-C) into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReamLiteError as e:
            # one line, also where the message quotes another library's multi-line error (transformers' config
            # validation)
            click.echo("error: " + " ".join(x.strip() for x in str(e).splitlines() if x.strip()), err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # disk full, permissions, ...
            click.echo(f"error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "), err=True)
            sys.exit(2)

    return wrapper


_TRUST_OPTION = click.option(
    "--trust-remote-code", is_flag=True,
    help="accept a model whose config.json needs its own code (a model_type this transformers does not know). "
    "Never needed for the supported families, whose built-in transformers classes are used even where the release "
    "ships code (auto_map); without it such a model is refused and no code from the checkpoint runs")


def _stream_options(fn):
    """Options shared by every command that streams a model."""
    opts = [
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... ('auto': cuda if available)"),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
                     help="compute dtype ('auto': the checkpoint's own)"),
        click.option("--max-gpu-memory", default=None, help="device memory budget, e.g. 20GB (default: 90% of the card, at most what is free less 0.5 GiB)"),
        click.option("--max-cpu-memory", default=None,
                     help="host RAM for cached hidden states, e.g. 16GB (default: 40% of RAM, at most 16 GiB)"),
        click.option("--work-dir", default=None, type=click.Path(file_okay=False),
                     help="where hidden states spill to disk when they fit neither budget (default: beside OUTPUT for compress, the system temp dir for eval)"),
        click.option("--store", "store_tier", type=click.Choice(["auto", "device", "host", "disk"]), default="auto",
                     show_default=True, help="force the hidden-state store tier"),
        click.option("--batch-tokens", default=4096, show_default=True, help="tokens per forward batch"),
        click.option("--experts-per-chunk", type=int, default=None,
                     help="run at most this many routed experts at once (default: as many as the memory budget "
                     "allows). The chunking decides float rounding: pinned, runs with other budgets, devices of "
                     "the same kind or numbers of processes (torchrun) compute the same output"),
        click.option("--expert-cache", type=click.Choice(EXPERT_CACHE_MODES), default="auto", show_default=True,
                     help="compress runs an MoE layer's routed experts in many passes (statistics, alignment, "
                     "merging, each plan the guard judges, the next layer's inputs). 'auto': when all of a layer's "
                     "experts, decoded, fit in the device budget beside everything else, read them once and keep "
                     "them on the device until the layer is done (~1.1 GiB for Qwen3-30B-A3B in bf16); else each "
                     "pass re-reads them from the checkpoint in chunks. 'off': always re-read (less memory, several "
                     "times the disk reads). The output is the same either way; `plan` says which is used"),
        _TRUST_OPTION,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _make_options(device, dtype, max_gpu_memory, max_cpu_memory, work_dir, store_tier, batch_tokens,
                  experts_per_chunk=None, expert_cache="auto", trust_remote_code=False) -> StreamOptions:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        gpu, cpu = parse_bytes(max_gpu_memory), parse_bytes(max_cpu_memory)
    except ValueError:
        raise ReamLiteError("memory budgets look like 20GB, 512MB or a number of bytes") from None
    return StreamOptions(
        device=device,
        dtype=DTYPES[dtype],
        max_gpu_memory=gpu,
        max_cpu_memory=cpu,
        work_dir=work_dir,
        store_tier=store_tier,
        tokens_per_batch=batch_tokens,
        expert_cache=expert_cache,
        trust_remote_code=trust_remote_code,
        experts_per_chunk=experts_per_chunk,
    )


def _bytes_option(name: str, text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise ReamLiteError(f"{name} {text}: expected a size like 5GB, 512MB or a number of bytes") from None


def _command_line() -> str:
    """This invocation as `ream-lite CMD ...`, rebuilt from the parsed options (arguments, then every option not
    at its default, in declaration order), without the flags that do not change the output: the same settings
    give the same line however they were typed."""
    ctx = click.get_current_context()
    parts = ["ream-lite", ctx.info_name]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if p.name in ("resume", "overwrite", "snapshot_every", "expert_cache") or v is None:
            continue
        default = p.get_default(ctx, call=True)
        if isinstance(p, click.Argument):
            parts.append(str(v))
        elif getattr(p, "is_flag", False):
            parts += [p.opts[0]] if v else []
        elif p.multiple:
            if tuple(v) != tuple(default or ()):
                parts += [x for item in v for x in (p.opts[0], str(item))]
        elif v != default:
            parts += [p.opts[0], str(v)]
    return shlex.join(parts)


def _calibration_options(fn):
    """What the calibration data is: shared by `compress` and `plan` (the plan's token counts follow from it)."""
    opts = [
        click.option("--calib", "calib", multiple=True, default=["builtin"], show_default=True, metavar="SPEC",
                     help="calibration source, repeatable: 'builtin' (offline, shipped: public-domain prose as "
                     "'general', permissively licensed code as 'code', generated worked math as 'math'), a JSONL "
                     "({'text', 'domain'}) / .txt file or a directory of them, or hf:PATH[:CONFIG[:SPLIT[:FIELD]]] "
                     "(needs `datasets` and a network); DOMAIN=SPEC puts a whole source in one domain"),
        click.option("--mix", default=None, metavar="RATIOS",
                     help="share of the sequences per domain: '0:0.3:0.7' (domains in order of appearance; builtin: "
                     "general:math:code, the paper's choice for large models) or 'general=0,math=0.3,code=0.7' "
                     "(default: equal shares)"),
        click.option("--num-sequences", default=256, show_default=True, help="calibration sequences (paper: 3072)"),
        click.option("--seq-len", default=512, show_default=True, help="tokens per calibration sequence (paper: 512)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _refit_options(fn):
    """The least-squares refit of the kept experts: shared by `compress` and `plan`."""
    opts = [
        click.option("--refit", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="after each layer's plan, re-solve the kept (and merged) experts' down projections by ridge "
                     "least squares so the compressed layer reproduces the original layer's routed output on the "
                     "calibration tokens. 'auto': used where the guard's held-out tokens (never fitted on) show it "
                     "beats the unfitted plan by more than 2 standard errors; for methods other than ream this turns "
                     "the guard on (holding out --holdout of the sequences); with --guard off nothing is refit (the "
                     "paper's algorithm exactly). 'on': always refit (unjudged with --guard off). 'off': never"),
        click.option("--refit-sweeps", default=2, show_default=True,
                     help="block coordinate descent sweeps over the kept experts"),
        click.option("--refit-ridge", default=1e-2, show_default=True,
                     help="ridge pulling each expert towards the plan's, in units of the mean diagonal of its Gram"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _refit(refit: str, refit_sweeps: int, refit_ridge: float):
    from ream_lite.refit import RefitOptions

    return RefitOptions(mode=refit, sweeps=refit_sweeps, ridge=refit_ridge)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="ream-lite")
@click.option("-v", "--verbose", is_flag=True, help="log progress details")
def main(verbose: bool) -> None:
    """ream-lite: shrink Mixture-of-Experts models by merging (REAM) or pruning (REAP) experts, one layer at a
    time, so that models far larger than your GPU compress on it.

    MODEL arguments are a local Hugging Face checkpoint directory (safetensors) or a hub id.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "matplotlib", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_TRUST_OPTION
@_user_errors
def inspect(model: str, as_json: bool, trust_remote_code: bool) -> None:
    """Describe MODEL from its headers only: family, layers, experts, router, storage and sizes."""
    from ream_lite.arch.layout import ModelLayout
    from ream_lite.inspect_model import describe, format_description

    d = describe(ModelLayout(model, trust_remote_code=trust_remote_code))
    click.echo(json.dumps(d, indent=2) if as_json else format_description(d))


@main.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="JSONL ({'text', 'domain'}), .txt, or a directory of them")
@click.option("--reference", default=None, help="compare against this model: KL(reference || MODEL) and top-1 agreement")
@click.option("--seq-len", default=256, show_default=True, help="tokens per window; documents of a domain are joined with EOS")
@click.option("--max-tokens", default=None, type=int, help="evaluate at most this many tokens per domain")
@click.option("--tokenizer", default=None, help="tokenizer directory or id (default: MODEL's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_stream_options
@_user_errors
def eval_cmd(model, data, reference, seq_len, max_tokens, tokenizer, as_json, **stream) -> None:
    """Perplexity of MODEL per domain, streamed layer by layer; with --reference, also KL and top-1 agreement."""
    from ream_lite.evaluate import evaluate, format_result

    opts = _make_options(**stream)
    opts.progress = not as_json and sys.stderr.isatty()
    r = evaluate(model, data, reference, seq_len, max_tokens, opts, tokenizer)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else format_result(r))


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--experts", required=True,
              help="experts to keep per MoE layer: a count (96) or a fraction of the current count (0.75)")
@click.option("--method", type=click.Choice(sorted(METHOD_NAMES)), default="ream", show_default=True,
              help="ream (merge, the paper), reap / frequency / ean (prune by score), random (control), "
              "hc-smoe, m-smoe (merging baselines)")
@click.option("--packing", type=click.Choice(["pack", "truncate"]), default="pack", show_default=True,
              help="pack: documents joined with EOS and cut into full windows; truncate: the first --seq-len tokens of "
              "each document (shorter ones kept as they are). Never padded")
@click.option("--chat-template", is_flag=True,
              help="wrap each document in the tokenizer's chat template (a user turn and an assistant turn)")
@_calibration_options
@click.option("--seed", default=0, show_default=True)
@click.option("--saliency", type=click.Choice(["reap", "frequency"]), default="reap", show_default=True,
              help="REAM centroid choice and merge weights")
@click.option("--saliency-gate", type=click.Choice(["model", "softmax", "twice"]), default="model", show_default=True,
              help="gate value in the REAP score: 'model' = softmax over all experts (softmax routers) or the "
              "weight the model applies (sigmoid routers); 'softmax' = softmax of raw logits for every family (the "
              "reference codes); 'twice' = the REAM reference's default, gate squared")
@click.option("--grouping", type=click.Choice(["pseudo-prune", "nearest-centroid"]), default="pseudo-prune",
              show_default=True)
@click.option("--group-size", default=None, type=int,
              help="REAM group size C, centroid included (default auto: 16, x2 when removing more than 25%, "
              "x2 per 256 experts beyond 256; clipped to [ceil(N/N'), N-N'+1])")
@click.option("--no-gate-logit-sim", is_flag=True, help="REAM similarity without the gate-logit term")
@click.option("--no-gated-sim", is_flag=True, help="REAM similarity without the gated-output term")
@click.option("--align", type=click.Choice(["act+weight", "act", "weight", "none"]), default="act+weight",
              show_default=True, help="neuron alignment cost before merging")
@click.option("--guard", type=click.Choice(["group", "layer", "off"]), default=None,
              help="default 'group': judge plans per layer on held-out calibration sequences by the error of the "
              "layer's output. REAM: write REAP pruning unless a REAM plan (a ladder of group sizes, "
              "nearest-centroid grouping) beats it by more than 2 standard errors ('layer'); 'group' also tries "
              "undoing single merged groups. Every method: judge the --refit. 'off' = the paper's algorithm exactly "
              "(no held-out tokens, no refit)")
@_refit_options
@click.option("--holdout", default=0.1, show_default=True,
              help="share of calibration sequences the guard holds out of the statistics to judge plans on")
@click.option("--no-sequential", is_flag=True,
              help="statistics of every layer from the original model (default: from the already compressed layers)")
@click.option("--drop-mtp", is_flag=True,
              help="write the model without its MTP (multi-token prediction) layers: DeepSeek-V3 / GLM / GLM-5 MTP "
              "layers, the Qwen3-Next / Qwen3.5 mtp.* block (by default they are kept and compressed like the decoder "
              "layers, on the hidden states they see; a serving engine then still accepts speculative tokens)")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard")
@click.option("--out-dtype", type=click.Choice(["stored", "bf16", "fp16", "fp32"]), default="stored",
              show_default=True,
              help="'stored': every tensor in the encoding MODEL stores it in (an FP8 / MXFP4 / bnb-4bit model stays "
              "so: kept tensors copied as stored, merged experts encoded with fresh scales); bf16/fp16/fp32: "
              "quantized tensors written decoded (plain ones as stored), quantization_config dropped")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]), default=None,
              help="write the Linear weights that transformers' bitsandbytes loader quantizes (attention, dense and "
              "shared MLPs; not the head, nor experts held as fused 3-D tensors) in bitsandbytes' 4-bit format, with "
              "its quantization_config, so from_pretrained(OUTPUT) loads in 4-bit. Merging runs first, in full "
              "precision")
@click.option("--double-quant", is_flag=True, help="with --quantize: bnb's nested quantization of the statistics")
@click.option("--out-format", type=click.Choice(["auto", "gguf"]), default="auto", show_default=True,
              help="'auto': as MODEL is stored (a safetensors checkpoint, or for a GGUF a GGUF of the same types); "
              "'gguf': write a safetensors MODEL as one llama.cpp GGUF file in OUTPUT (routed experts in --gguf-type, "
              "other matrices Q8_0, norms and routers F32; qwen3_moe, qwen2_moe, mixtral, glm4_moe, deepseek_v3, "
              "deepseek_v2)")
@click.option("--gguf-type", default="Q8_0", show_default=True,
              help="with --out-format gguf: the routed experts' llama.cpp type (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, MXFP4 "
              "...; quantized as llama.cpp's reference quantizer does)")
@click.option("--tokenizer", default=None, help="tokenizer directory or id (default: MODEL's)")
@click.option("--save-stats", default=None, type=click.Path(file_okay=False),
              help="also save every MoE layer's statistics in this directory (with --no-sequential they can be "
              "re-planned at other ratios by --from-stats)")
@click.option("--from-stats", default=None, type=click.Path(file_okay=False),
              help="plan from statistics saved by an earlier --no-sequential --save-stats run of the same model, "
              "with no calibration pass (pruning methods, or merging with --align weight/none and --guard off)")
@click.option("--overwrite", is_flag=True, help="replace OUTPUT (or an interrupted OUTPUT.partial) if it exists")
@click.option("--resume", is_flag=True,
              help="continue the interrupted run recorded in OUTPUT.partial from its first unfinished layer (refused "
              "if the settings, the calibration or the input model changed); the result is byte for byte what an "
              "uninterrupted run writes")
@click.option("--snapshot-every", default="auto", show_default=True, metavar="auto|N|layer|off",
              help="when the resume record saves the next layer's input hidden states (one [tokens x hidden] buffer, "
              "written and synced into OUTPUT.partial/: 6 GiB per snapshot for Qwen3-30B-A3B at the paper's 3072 x "
              "512 tokens). More often = more disk writes, less work lost: --resume re-runs the layers after the last "
              "snapshot. 'auto': when the time since the last one is 20x what that one took (snapshots cost at most "
              "~5% of the run) or 30 min; N: every N layers; 'layer': after every layer; 'off': never (no writes; an "
              "interrupted run starts over). Does not change the output, and a resume may use another value")
@_stream_options
@_user_errors
def compress(model, output, experts, method, calib, mix, packing, chat_template, num_sequences, seq_len, seed, saliency, saliency_gate, grouping,
             group_size, no_gate_logit_sim, no_gated_sim, align, guard, holdout, no_sequential, drop_mtp, max_shard_size,
             out_dtype, quantize, double_quant, out_format, gguf_type, tokenizer, save_stats, from_stats, overwrite,
             resume, snapshot_every, refit, refit_sweeps, refit_ridge, **stream) -> None:
    """Compress MODEL into OUTPUT with fewer routed experts per MoE layer, one layer at a time.

    Writes a checkpoint in MODEL's own layout and key names (loads with transformers'
    AutoModelForCausalLM.from_pretrained), plus ream_plan.json: per layer, the kept experts, the merged groups
    with their weights, and every expert's scores. MODEL may be a GGUF file (llama.cpp's format, split files
    too): OUTPUT then holds a GGUF of the same metadata and types (kept experts' blocks copied, merged experts
    quantized to their tensor's type); --out-format gguf writes a safetensors MODEL as a GGUF.
    """
    from ream_lite import distributed
    from ream_lite.methods import MethodOptions
    from ream_lite.pipeline import CompressConfig
    from ream_lite.pipeline import compress as run

    world = distributed.World.from_env()  # (under torchrun: one process per device, rank 0 runs the compression)
    distributed.set_current(world)
    opts = _make_options(**stream)
    opts.device = world.device(opts.device)
    if world.size > 1 and opts.device.startswith("cuda"):
        torch.cuda.set_device(opts.device)  # (this rank's card is the current one: its peak memory is reported)
    opts.progress = sys.stderr.isatty() and world.is_main
    method_opts = MethodOptions(
        saliency=saliency, saliency_gate=saliency_gate, grouping=grouping, group_size=group_size,
        gate_logit_sim=not no_gate_logit_sim, gated_sim=not no_gated_sim, align=align,
    )
    cfg = CompressConfig(
        model=model, output=output, experts=experts, method=method, options=method_opts, calib=list(calib),
        mix=mix, packing=packing, chat_template=chat_template,
        num_sequences=num_sequences, seq_len=seq_len, seed=seed, sequential=not no_sequential, overwrite=overwrite,
        drop_mtp=drop_mtp, max_shard_bytes=_bytes_option("--max-shard-size", max_shard_size), tokenizer=tokenizer,
        guard=guard, holdout=holdout, stream=opts, resume=resume, snapshot_every=snapshot_every,
        command=_command_line(), refit=_refit(refit, refit_sweeps, refit_ridge),
        save_stats=save_stats, from_stats=from_stats, out_dtype=out_dtype, quantize=quantize,
        double_quant=double_quant, out_format=out_format, gguf_type=gguf_type,
    )
    if not world.is_main:
        from ream_lite.rank_worker import serve

        serve(world, cfg)
        world.close()
        # (a rank > 0 leaves at once: its interpreter's teardown, racing rank 0's, sometimes aborted in gloo's
        # threads, turning a finished run into a failed one)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    # (rank 0 stopping with an error exits non-zero: torchrun then stops the other ranks, wherever they wait)
    out = run(cfg, echo=lambda line: click.echo(line, err=True))
    world.broadcast(("done",))
    world.close()
    click.echo(f"wrote {out}")
    _echo_time(os.path.join(out, "ream_report.json"))


def _echo_time(report_path: str) -> None:
    """The closing summary's line of where the time went (ream_report.json totals.time), when the report has it."""
    from ream_lite.pipeline import time_line

    try:
        with open(report_path) as f:
            split = json.load(f)["totals"]["time"]
    except (OSError, ValueError, KeyError):
        return
    click.echo(time_line(split))


@main.command(name="apply")
@click.argument("plan", type=click.Path())
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, help="where experts are merged (cpu, cuda, cuda:1, ...)")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard")
@click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
@_TRUST_OPTION
@_user_errors
def apply_cmd(plan, model, output, device, max_shard_size, overwrite, trust_remote_code) -> None:
    """Re-apply the compression recorded in PLAN (a ream_plan.json, or a compressed model's directory) to MODEL,
    writing OUTPUT, without calibration: the kept experts, merge groups, weights and neuron permutations come from
    the plan. On the same device type the result is byte for byte what `compress` wrote."""
    from ream_lite.apply_plan import apply_plan

    require_device(torch.device(device))
    out = apply_plan(plan, model, output, overwrite=overwrite, device=device,
                     max_shard_bytes=_bytes_option("--max-shard-size", max_shard_size), progress=sys.stderr.isatty(),
                     trust_remote_code=trust_remote_code)
    click.echo(f"wrote {out}")


@main.command(name="plan")
@click.argument("model")
@click.argument("output", required=False, type=click.Path(file_okay=False))
@click.option("--experts", required=True,
              help="experts to keep per MoE layer: a count (96) or a fraction of the current count (0.75)")
@click.option("--method", type=click.Choice(sorted(METHOD_NAMES)), default="ream", show_default=True)
@click.option("--guard", type=click.Choice(["group", "layer", "off"]), default=None,
              help="as for compress (default 'group'; 'off' for other methods than ream with --refit off)")
@_refit_options
@_calibration_options
@click.option("--holdout", default=0.1, show_default=True, help="share of sequences the guard holds out")
@click.option("--no-sequential", is_flag=True, help="as for compress: no re-run of the compressed layers")
@click.option("--drop-mtp", is_flag=True, help="as for compress: MTP layers are not written")
@click.option("--no-measure", is_flag=True, help="skip the read and compute measurements; assume slow-end rates")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="processes of a torchrun run (torchrun --nproc-per-node N -m ream_lite compress ...): what each "
              "rank reads in the statistics passes and the peak device memory of the ranks that serve them")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_stream_options
@_user_errors
def plan_cmd(model, output, experts, method, guard, calib, mix, num_sequences, seq_len, holdout, no_sequential, drop_mtp,
             no_measure, nproc, as_json, refit, refit_sweeps, refit_ridge, **stream) -> None:
    """What `compress MODEL OUTPUT` with the same options will need, from MODEL's headers only, before any work.

    \b
    table      per decoder layer (runs of equal layers on one row): kind (moe, dense, mtp), bytes of the
               tensors other than routed experts (attention, norms, router, shared experts) and of the
               routed experts as stored, experts before -> after, expert chunks x experts per chunk (a
               chunk is decoded onto the device at once), bytes written to OUTPUT
    memory     hidden states: one [tokens x hidden] buffer in the compute dtype, times the buffers alive
               at once (layer input and output, + the guard's float32 held-out buffers), and the tier
               they fit: device, host RAM, or files in the work dir; peak device: the largest phase of
               an MoE layer (expert chunks, the alignment pass's centroid-with-members chunk and Grams,
               a merged group in float32) with the layer's weights, activations and device-tier
               hidden states; peak host: host-tier hidden states, weight staging, merged experts kept
               for the guard, and the runtime itself (page cache not counted)
    disk       output: tensors + shard headers + side files + ream_plan.json; resume: the hidden-state
               snapshot kept in OUTPUT.partial/ while it runs (two for a moment after each layer); work
               dir: hidden-state files (disk tier only); reads: bytes read from MODEL, re-reads included
               (each pass over a layer reads its experts again)
    time       the work of every pass (statistics, alignment and its Hungarian assignments, the guard's
               candidates on held-out tokens, the sequential re-run, attention and the rest of each layer)
               over rates measured here: a read of the largest shard from the disk (the page cache may
               inflate it) and again from the page cache (a layer's re-reads, where it fits in RAM), and
               the engine's own expert, statistics and alignment code timed at the model's shape in the
               compute dtype on the device; writing the output at the read rate; floor: each byte read once

    With OUTPUT (and --work-dir), also checks that their filesystems have the space. The token count
    assumes the calibration text yields --num-sequences windows.
    """
    from pathlib import Path

    from ream_lite.arch.layout import ModelLayout
    from ream_lite.diskspace import disk_shortfall
    from ream_lite.estimate import estimate_compression
    from ream_lite.pipeline import CompressConfig, resolve_keep, validate

    opts = _make_options(**stream)
    require_device(torch.device(opts.device))
    layout = ModelLayout(model, trust_remote_code=opts.trust_remote_code)
    # validate() wants an output path; without one, a sibling of MODEL stands in (never inside it)
    target = output or str(layout.path.resolve().with_name(layout.path.resolve().name + "-compressed"))
    cfg = CompressConfig(model=model, output=target, experts=experts, method=method, calib=list(calib), mix=mix,
                         num_sequences=num_sequences,
                         seq_len=seq_len, sequential=not no_sequential, drop_mtp=drop_mtp, guard=guard,
                         holdout=holdout, stream=opts, refit=_refit(refit, refit_sweeps, refit_ridge))
    n_keep = resolve_keep(layout, experts)
    validate(layout, n_keep, cfg)
    est = estimate_compression(layout, cfg, n_keep, measure=not no_measure)
    shortfall = None
    if output:
        work_dir = opts.work_dir or str(Path(output).resolve().parent)  # compress's default
        shortfall = disk_shortfall(output, est.output_disk_bytes + est.resume_bytes, work_dir, est.work_dir_bytes)
    from ream_lite.distributed import rank_lines, rank_plan

    if nproc < 1:
        raise ReamLiteError("--nproc: give at least 1")
    ranks = rank_plan(est, layout, nproc) if nproc > 1 else None
    if as_json:
        click.echo(json.dumps({**est.to_dict(), "disk_shortfall": shortfall, **({"ranks": ranks} if ranks else {})},
                              indent=2))
        return
    click.echo("\n".join(est.lines() + (rank_lines(ranks) if ranks else [])))
    if output:
        click.echo(f"disk space: {shortfall}" if shortfall else "disk space: enough for the output and work dir")


if __name__ == "__main__":
    main()
