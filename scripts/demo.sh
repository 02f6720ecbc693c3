#!/usr/bin/env bash
# The main job on a CPU: prepare TinyStories, train the `mini` preset with Muon on a fixed number of tokens,
# evaluate it, write the samples report, the results page and plots, and tell a story. `make demo` runs this
# with .venv's tinygemma. The model, recipe and budget are bench/cpu_speedrun.py's winner: the lowest
# whole-validation loss for about 10 minutes of training on a quiet 2-core CPU. Training is seeded and counted
# in tokens, not minutes, so every machine trains on the same batches with the same schedule; only the time
# differs, and the precision: bf16 autocast where the CPU computes bf16 natively (avx512_bf16 or AMX), else fp32
# (the same loss per token within ~0.01 nats in bench/cpu_speedrun.py; emulated bf16 would be slower than fp32).
#   TINYSTORIES_DIR  local TinyStories .txt folder (default: the hub dataset, which needs internet)
#   DEMO_DATA, DEMO_OUT, DEMO_TOKENS  where the data and the run go, and the training tokens
#                                     (default 1,433,600 = 700 steps of 16 x 128)
#   DEMO_PRECISION   bf16 or fp32 (default: as above)
#   DEMO_MAX_STORIES  prepare only the first N stories of each split (the tests' shortened run)
set -euo pipefail
TINYGEMMA=${TINYGEMMA:-.venv/bin/tinygemma}
DATA=${DEMO_DATA:-data/tinystories}
OUT=${DEMO_OUT:-runs/demo}
TOKENS=${DEMO_TOKENS:-1433600}
if [ -z "${DEMO_PRECISION:-}" ] && grep -qw -e avx512_bf16 -e amx_bf16 /proc/cpuinfo 2>/dev/null; then
  DEMO_PRECISION=bf16
fi
PRECISION=${DEMO_PRECISION:-fp32}
SOURCE=${TINYSTORIES_DIR:-roneneldan/TinyStories}
step() { printf '\n== %s\n' "$*"; }
start=$SECONDS

step "1/6 prepare: $SOURCE -> $DATA"
$TINYGEMMA prepare --source "$SOURCE" --out "$DATA" ${DEMO_MAX_STORIES:+--max-stories "$DEMO_MAX_STORIES"}

STEPS=$(( (TOKENS + 2047) / 2048 ))
step "2/6 train: mini preset, Muon, $TOKENS tokens (seed 1337), $PRECISION on the CPU -> $OUT"
t0=$SECONDS
$TINYGEMMA train --data "$DATA" --out "$OUT" --force --recipe muon --model mini --device cpu --precision "$PRECISION" \
  --block-size 128 --micro-batch 16 --grad-accum 1 --lr 1e-2 --muon-lr 3e-3 --max-tokens "$TOKENS" --seed 1337 \
  --eval-interval $(( STEPS / 10 > 0 ? STEPS / 10 : 1 )) --eval-batches 4 --log-interval 5
printf 'training took %d s\n' $((SECONDS - t0))

step "3/6 eval: the whole validation split"
$TINYGEMMA eval "$OUT" --data "$DATA"  # scored at the training block size; kept for step 6's report

step "4/6 samples: the tutorial's five prompts -> $OUT/samples.md (+ .html)"
$TINYGEMMA samples "$OUT" --out "$OUT/samples.md" --force --max-new-tokens 150

step "5/6 generate: a story from $OUT/best"
$TINYGEMMA generate "$OUT" --prompt "Once upon a time there was a pumpkin." --seed 0 --max-new-tokens 400

step "6/6 report: the results page -> $OUT/report/report.md (+ .html, plots)"
$TINYGEMMA report "$OUT" --data "$DATA" --out "$OUT/report" --force
printf '\nplots: %s/loss.png %s/lr.png %s/grad_norm.png; studio: %s serve %s\n' "$OUT" "$OUT" "$OUT" "$TINYGEMMA" "$OUT"
printf 'notebook: make notebook (re-executes notebooks/inference.ipynb against %s)\n' "$OUT"
printf 'the demo took %d min %d s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60))
