#!/usr/bin/env bash
# The main job on a CPU: prepare TinyStories, train the tiny preset on a fixed number of tokens, evaluate
# it, write the samples report and plots, and tell a story. `make demo` runs this with .venv's tinygemma.
# Training is seeded and counted in tokens, not minutes, so every machine gets the same model and figures.
#   TINYSTORIES_DIR  local TinyStories .txt folder (default: the hub dataset, which needs internet)
#   DEMO_DATA, DEMO_OUT, DEMO_TOKENS  where the data and the run go, and the training tokens
#                                     (default 737,280 = 360 steps of 16 x 128)
#   DEMO_MAX_STORIES  prepare only the first N stories of each split (the tests' shortened run)
set -euo pipefail
TINYGEMMA=${TINYGEMMA:-.venv/bin/tinygemma}
DATA=${DEMO_DATA:-data/tinystories}
OUT=${DEMO_OUT:-runs/demo}
TOKENS=${DEMO_TOKENS:-737280}
SOURCE=${TINYSTORIES_DIR:-roneneldan/TinyStories}
step() { printf '\n== %s\n' "$*"; }
start=$SECONDS

step "1/5 prepare: $SOURCE -> $DATA"
$TINYGEMMA prepare --source "$SOURCE" --out "$DATA" ${DEMO_MAX_STORIES:+--max-stories "$DEMO_MAX_STORIES"}

step "2/5 train: tiny preset, $TOKENS tokens (seed 1337) on the CPU -> $OUT"
t0=$SECONDS
$TINYGEMMA train --data "$DATA" --out "$OUT" --force --recipe adamw --model tiny --device cpu --block-size 128 \
  --micro-batch 16 --grad-accum 1 --lr 3e-3 --warmup-steps 20 --max-tokens "$TOKENS" --seed 1337 \
  --eval-interval 25 --eval-batches 8 --log-interval 5 --samples
printf 'training took %d s\n' $((SECONDS - t0))

step "3/5 eval: the whole validation split"
$TINYGEMMA eval "$OUT" --data "$DATA" --block-size 128

step "4/5 samples: the tutorial's five prompts -> $OUT/samples.md (+ .html)"
$TINYGEMMA samples "$OUT" --out "$OUT/samples.md" --force --max-new-tokens 150  # replaces training's last report

step "5/5 generate: a story from $OUT/best"
$TINYGEMMA generate "$OUT" --prompt "Once upon a time there was a pumpkin." --seed 0 --max-new-tokens 200
printf '\nplots: %s/loss.png %s/lr.png %s/grad_norm.png; studio: %s serve %s\n' "$OUT" "$OUT" "$OUT" "$TINYGEMMA" "$OUT"
printf 'notebook: make notebook (re-executes notebooks/inference.ipynb against %s)\n' "$OUT"
printf 'the demo took %d min %d s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60))
