#!/usr/bin/env bash
# Side-by-side on the JPEG images, equal epochs, fast recipe, one seed: a 4/4-bit ResNet-20 (stem
# and classifier 8-bit) alone and distilled from the Part 1 float ResNet-20, then the 2/2-bit
# variant (2-bit activations cut the ops term only with 2-bit weights: it takes the larger) and the
# early-downsampling stems, at their scores. Resumable: finished runs (OUT/NAME.json) are skipped,
# an interrupted one resumes from its checkpoint.
#   bash benchmarks/record_variants_jpeg.sh [OUT] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/2026-11-25-record-variants-jpeg}
EPOCHS=${2:-5}
DATA=imagefolder:~/data/cifar10-jpeg
TEACHER=runs/part1-jpeg/resnet20/model.pt  # written by benchmarks/part1_jpeg.sh
mkdir -p "$OUT"
run() {  # NAME [train options]
  [ -f "$OUT/$1.json" ] && return 0
  echo "+ microsearch train ... --out runs/record-variants/$1 ${*:2}" >&2
  .venv/bin/microsearch train --data $DATA --model resnet20 --epochs $EPOCHS --recipe fast \
    --first-last-bits 8 --out runs/record-variants/$1 --json "${@:2}" > "$OUT/$1.json.tmp"
  mv "$OUT/$1.json.tmp" "$OUT/$1.json"
}
run w4a4 --weight-bits 4 --act-bits 4
run w4a4-distill --weight-bits 4 --act-bits 4 --teacher $TEACHER
run w2a2-distill --weight-bits 2 --act-bits 2 --teacher $TEACHER
run w4a4-stride2-distill --weight-bits 4 --act-bits 4 --model-arg stem=stride2 --teacher $TEACHER
run w4a4-s2d-distill --weight-bits 4 --act-bits 4 --model-arg stem=s2d --teacher $TEACHER
