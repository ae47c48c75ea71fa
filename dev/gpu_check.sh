#!/usr/bin/env bash
# The GPU check of `flash2` (issue 20), in one run of at most 8 minutes on a CUDA machine:
#   1. flash2's own GPU tests: the flash-attn adapter against its documented semantics, and the
#      composition against `reference` in fp16 and bf16 (values and q/k/v gradients);
#   2. `toroidal validate --device cuda --dtype bf16`: every backend against `reference`;
#   3. a bf16 bench table, causal, lambda = 0.1, D = 4, N = 1024..16384, fwd and fwd+bwd:
#      flash2 and sdpa in one sweep, flex (which compiles per shape) in another.
# Bench rows carry the plain-SDPA baselines timed alternately with them: `sdpa_torus_ms` (flash
# SDPA on the L = N*D platter-tokens of width e/D) and `sdpa_standard_ms` (on the N tokens of
# width e); `overhead` and `vs_standard` are the row's median over each.
#
# Run from anywhere: bash dev/gpu_check.sh. JSON goes to results/bench-gpu/ (OUT_DIR to change it).
# It installs nothing from the network. flash-attn is used if python can import it, or installed
# from a wheel left in .whl/ (flash_attn-*.whl, built for this torch and CUDA); without either,
# flash2's rows are skipped with their reason and the rest still runs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-results/bench-gpu}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
# timeout sends SIGTERM first: bench and validate stop after the current row and keep what they have.
run() { local limit=$1; shift; timeout -k 20 "$limit" "$@" || { echo "exit $? from: $*"; status=1; }; }

step "environment"
if ! "$PY" -c "import flash_attn" 2>/dev/null; then
    wheel=$(ls .whl/flash_attn-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ]; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/flash-attn-site "$wheel" \
            && export PYTHONPATH="/tmp/flash-attn-site:$PYTHONPATH"
    fi
fi
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import flash_attn
    print("flash-attn", flash_attn.__version__)
except Exception as exc:  # noqa: BLE001
    print("flash-attn unavailable:", exc, "(flash2 rows will be skipped)")
EOF
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU here"; exit 2; }
mkdir -p "$OUT_DIR"

step "flash2 GPU tests"
run 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_flash2.py -k gpu -rs

step "validate, bf16"
run 120 "$PY" -m toroidal_cli validate --device cuda --dtype bf16 --out "$OUT_DIR/validate-bf16-$STAMP.json"

BENCH=(--device cuda --dtype bf16 --mode fwd,fwd+bwd --causal --lambda 0.1 -d 4 -n 1024,2048,4096,8192,16384
       --batch 1 --heads 16 --head-dim 128 --warmup 2 --repeats 5 --memory-budget-gb 40)
step "bench flash2, sdpa"
run 110 "$PY" -m toroidal_cli bench -b flash2,sdpa "${BENCH[@]}" --out "$OUT_DIR/bench-flash2-sdpa-bf16-$STAMP.json"
step "bench flex"
run 130 "$PY" -m toroidal_cli bench -b flex "${BENCH[@]}" --out "$OUT_DIR/bench-flex-bf16-$STAMP.json"

step "done"
ls -l "$OUT_DIR"
exit $status
