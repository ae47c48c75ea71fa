#!/usr/bin/env bash
# How the CPU backends scale with sequence length (configs/bench/cpu-scaling.yaml: depth 4,
# 8 heads, d_model 512, N = 1024..8192, forward, fp32), each row timed against plain SDPA in
# the same run. Takes about 15 minutes on 2 CPU cores; run it on an otherwise idle machine.
#
#   bash results/bench-cpu/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
toroidal bench --config cpu-scaling --out "$here/cpu-scaling.json" --plot "$here/cpu-scaling.png"
python "$here/../summarize.py" bench-cpu "$here" > "$here/summary.md"
