#!/usr/bin/env bash
# Length extrapolation: tiny Llama-family models (4 layers, 128 wide) trained from scratch at
# 128 byte tokens on WikiText-2 valid.txt, scored on test.txt at 1x, 2x, 4x and 8x that length.
# Six arms, three seeds each, equal steps and tokens. Takes about 35 minutes on 2 idle CPU cores.
# The torus distance is normalized (ring/P + |k-l|/D <= 1), so at the default lambda 0.1 it moves
# a score by at most 0.1; toroidal-nope-l16 gives it ALiBi's order of magnitude (up to 16).
#
#   WIKITEXT=/path/to/wikitext-2 bash results/extrapolation/run.sh
#
# Finished runs are kept in runs/ and skipped when the script is run again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wikitext="${WIKITEXT:-$here/../../../shared/data/wikitext-2}"
runs="$here/runs"
steps=500          # x 16 samples x 128 tokens = 1.02M training tokens per run
seeds="0 1 2"
mkdir -p "$runs"

arm_flags() {
  case "$1" in
    rope)          echo "--mechanism standard --position rope" ;;
    nope)          echo "--mechanism standard --position none" ;;
    alibi)         echo "--mechanism alibi --position none" ;;
    toroidal-rope) echo "--mechanism toroidal --position rope --depth 2 --lambda 0.1" ;;
    toroidal-nope) echo "--mechanism toroidal --position none --depth 2 --lambda 0.1" ;;
    toroidal-nope-l16) echo "--mechanism toroidal --position none --depth 2 --lambda 16" ;;
  esac
}
arms="rope nope alibi toroidal-rope toroidal-nope toroidal-nope-l16"

for arm in $arms; do
  for seed in $seeds; do
    run="$runs/$arm-seed$seed"
    # a finished run has its model and was not interrupted
    [ -d "$run/model" ] && ! grep -q '"interrupted"' "$run/metrics.json" && continue
    rm -rf "$run"
    # shellcheck disable=SC2046  # the arm's flags are meant to split
    toroidal train --model tiny $(arm_flags "$arm") --seed "$seed" \
      --dataset "text:$wikitext/valid.txt" --tokenizer bytes \
      --seq-len 128 --batch-size 16 --steps "$steps" --eval-every 0 --out "$run"
  done
done

# The same first 131,072 tokens (128 x 1024) of test.txt at every length.
for arm in $arms; do
  for seed in $seeds; do
    result="$here/$arm-seed$seed.json"
    [ "$result" -nt "$runs/$arm-seed$seed/metrics.json" ] && continue  # scored after its training
    toroidal eval --checkpoint "$runs/$arm-seed$seed" \
      --dataset "text:$wikitext/test.txt" --split all --max-tokens 131072 \
      --seq-len 128,256,512,1024 --batch-size 8 --out "$result"
  done
done

files=() labels=()
for arm in $arms; do
  for seed in $seeds; do
    files+=("$here/$arm-seed$seed.json")
    labels+=(--label "$arm")
  done
done
toroidal plot lengths "${files[@]}" "${labels[@]}" --group --out "$here/extrapolation.png"
python "$here/../summarize.py" extrapolation "$here" > "$here/summary.md"
