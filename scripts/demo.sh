#!/usr/bin/env bash
# The main job on a CPU: prepare TinyStories, train the tiny preset for a few minutes, evaluate it,
# write the samples report and plots, and tell a story. `make demo` runs this with .venv's tinygemma.
#   TINYSTORIES_DIR  local TinyStories .txt folder (default: the hub dataset, which needs internet)
#   DEMO_DATA, DEMO_OUT, DEMO_MINUTES  where the data and the run go, and the training time budget
#   DEMO_MAX_STORIES  prepare only the first N stories of each split (the tests' shortened run)
set -euo pipefail
TINYGEMMA=${TINYGEMMA:-.venv/bin/tinygemma}
DATA=${DEMO_DATA:-data/tinystories}
OUT=${DEMO_OUT:-runs/demo}
MINUTES=${DEMO_MINUTES:-4}
SOURCE=${TINYSTORIES_DIR:-roneneldan/TinyStories}
step() { printf '\n== %s\n' "$*"; }

step "1/5 prepare: $SOURCE -> $DATA"
$TINYGEMMA prepare --source "$SOURCE" --out "$DATA" ${DEMO_MAX_STORIES:+--max-stories "$DEMO_MAX_STORIES"}

step "2/5 train: tiny preset, $MINUTES minutes on the CPU -> $OUT"
$TINYGEMMA train --data "$DATA" --out "$OUT" --force --model tiny --device cpu --block-size 128 \
  --micro-batch 16 --grad-accum 1 --lr 3e-3 --warmup-steps 20 --time-budget "$MINUTES" \
  --eval-interval 25 --eval-batches 8 --log-interval 5 --samples

step "3/5 eval: the whole validation split"
$TINYGEMMA eval "$OUT" --data "$DATA" --block-size 128

step "4/5 samples: the tutorial's five prompts -> $OUT/samples.md (+ .html)"
$TINYGEMMA samples "$OUT" --out "$OUT/samples.md" --max-new-tokens 150

step "5/5 generate: a story from $OUT/best"
$TINYGEMMA generate "$OUT" --prompt "Once upon a time there was a pumpkin." --seed 0 --max-new-tokens 200
printf '\nplots: %s/loss.png %s/lr.png %s/grad_norm.png; studio: %s serve %s\n' "$OUT" "$OUT" "$OUT" "$TINYGEMMA" "$OUT"
