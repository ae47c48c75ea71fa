#!/usr/bin/env bash
# A real pretrained model: SmolLM2-135M (Llama family, 30 layers, 9 query / 3 key-value heads),
# loaded from its GGUF file. Arms, all with the same seed, data and token budget:
#   base            the untouched model
#   toroidal-l0     toroidal attention (D=2, lambda=0.1) in layer 0, only that layer's attention trained
#   standard-l0     control: layer 0's own attention trained the same way
#   toroidal-l0-3   toroidal attention in layers 0-3, only their attention trained
#   standard-l0-3   control: layers 0-3's own attention trained the same way
# Fine-tuning: WikiText-2 valid.txt, 512-token samples, 40 steps x 2 samples (41k tokens), AdamW
# lr 1e-4. Evaluation: perplexity on the first 16,384 tokens of WikiText-2 test.txt at 512 and 1024
# tokens; passkey and needle retrieval (toroidal longbench) at 512, 1024 and 2048 tokens, 10 samples
# each. A controlled comparison needs each toroidal arm beside its own trained control, so every arm
# runs longbench on its own (`longbench --both` would set a toroidal run beside the untouched base).
# Takes about 40 minutes on 2 idle CPU cores.
#
#   GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf WIKITEXT=/path/to/wikitext-2 bash results/real-model/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="$here/../../../shared"
gguf="${GGUF:-$shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
wikitext="${WIKITEXT:-$shared/data/wikitext-2}"
runs="$here/runs"
mkdir -p "$runs"

score() {  # score NAME MODEL-FLAGS...: perplexity at 512 and 1024 tokens
  local name="$1"; shift
  toroidal eval "$@" --dataset "text:$wikitext/test.txt" --split all --max-tokens 16384 \
    --seq-len 512,1024 --batch-size 1 --out "$here/eval-$name.json"
}

retrieval() {  # retrieval NAME MODEL-FLAGS...: passkey and needle accuracy at 512, 1024 and 2048 tokens
  local name="$1"; shift
  toroidal longbench "$@" --tasks passkey,needle --lengths 512,1024,2048 --limit 10 \
    --out "$here/longbench-$name.json"
}

score base --model "$gguf"
retrieval base --model "$gguf" --baseline

for arm in toroidal-l0 standard-l0 toroidal-l0-3 standard-l0-3; do
  case "$arm" in
    toroidal-*) mechanism="--mechanism toroidal --depth 2 --lambda 0.1" ;;
    standard-*) mechanism="--mechanism standard" ;;
  esac
  case "$arm" in
    *-l0)   layers=0 ;;
    *-l0-3) layers=0,1,2,3 ;;
  esac
  run="$runs/$arm"
  if [ ! -d "$run/model" ] || grep -q '"interrupted"' "$run/metrics.json"; then
    rm -rf "$run"
    # shellcheck disable=SC2086  # the mechanism flags are meant to split
    toroidal train --model "$gguf" $mechanism --layers "$layers" --freeze-base --seed 0 \
      --dataset "text:$wikitext/valid.txt" --seq-len 512 --batch-size 2 --steps 40 \
      --lr 1e-4 --warmup-steps 4 --eval-every 0 --eval-batches 4 --out "$run"
  fi
  cp "$run/metrics.json" "$here/train-$arm.json"
  score "$arm" --checkpoint "$run"
  retrieval "$arm" --checkpoint "$run"
done

python "$here/../summarize.py" real-model "$here" > "$here/summary.md"
