#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one go (about 9 minutes on an H100; needs ~60 GB of free disk):
#   1. Qwen3-30B-A3B shape, 1 layer, guarded REAM at the paper's calibration (3072 x 512 tokens), 20 GiB budget;
#   2. the same shape, 2 layers, REAP at the paper's calibration, 20 GiB budget;
#   3. DeepSeek-V3 shape, 1 MoE layer (22.5 GB of routed experts), REAP with expert chunking under 22 GiB.
# Results (JSON, one file per step, rewritten after every run) go to $OUT (default ./gpu-results).
set -u
OUT=${OUT:-gpu-results}
W=${WORK:-/tmp/ream-scale}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pyc}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 240 python benchmarks/scale.py --layers 1 --sequences 3072 --seq-len 512 --device cuda --methods ream \
    --budgets 20GiB --dir "$W/q1" --json "$OUT/qwen3_ream_paper_1L.json" 2>&1 | tail -8
pkill -f scale_child.py; rm -rf "$W/q1"
timeout 130 python benchmarks/scale.py --layers 2 --sequences 3072 --seq-len 512 --device cuda --methods reap \
    --budgets 20GiB --dir "$W/q2" --json "$OUT/qwen3_reap_paper_2L.json" 2>&1 | tail -8
pkill -f scale_child.py; rm -rf "$W/q2"
timeout 210 python benchmarks/scale.py --shape deepseek-v3 --layers 1 --dense-layers 0 --sequences 64 --seq-len 512 \
    --device cuda --methods reap --budgets 22GiB --dir "$W/d1" --json "$OUT/deepseek_v3_reap_1L.json" 2>&1 | tail -8
pkill -f scale_child.py; rm -rf "$W/d1"
