#!/usr/bin/env bash
# `make demo-instruct`: fine-tune the demo's checkpoint on instructions derived from the same stories, and
# measure how often its stories follow them (the notebook's section 9 reads the result). Run `make demo` first.
# On 2 CPU cores about 15 minutes. What it shows is how little a 10-minute base learns here: see
# docs/instructions.md ("What fine-tuning teaches a small model") for the measurements and their causes.
set -euo pipefail
TINYGEMMA=${TINYGEMMA:-.venv/bin/tinygemma}
BASE=${DEMO_OUT:-runs/demo}
DATA=${DEMO_INSTRUCT_DATA:-data/tinystories-derived}
OUT=${DEMO_INSTRUCT_OUT:-runs/demo-instruct}
SOURCE=${TINYSTORIES_DIR:-roneneldan/TinyStories}
STEPS=${DEMO_INSTRUCT_STEPS:-400}
test -d "$BASE" || { echo "make demo-instruct: no $BASE; run make demo first" >&2; exit 2; }
start=$SECONDS
printf '\n== 1/3 prepare: instructions derived from %s -> %s\n' "$SOURCE" "$DATA"
$TINYGEMMA prepare --source "$SOURCE" --out "$DATA" --derive-instructions
printf '\n== 2/3 finetune: %s, %s steps of 8 records -> %s\n' "$BASE" "$STEPS" "$OUT"
$TINYGEMMA finetune "$BASE" --data "$DATA" --out "$OUT" --force --device cpu --no-compile --block-size 384 \
  --micro-batch 8 --max-steps "$STEPS" --lr 1e-3 --warmup-steps 10 --eval-interval "$STEPS" --eval-batches 2
printf '\n== 3/3 eval --instruct: 50 held-out records\n'
$TINYGEMMA eval "$OUT" --instruct "$DATA" --records 50
printf '\nthe instruct demo took %d min %d s; notebook: make notebook\n' $(((SECONDS - start) / 60)) \
  $(((SECONDS - start) % 60))
