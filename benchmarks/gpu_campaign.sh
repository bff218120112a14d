#!/usr/bin/env bash
# On a lent GPU machine, in the repository root, with the folder of benchmarks/pack_campaign.sh
# carried beside it: installs the packed wheels next to that machine's torch (never replacing it),
# unpacks the JPEG images and runs the campaign for at most SECONDS, stopping it cleanly (SIGINT:
# a running trial is requeued, a retrain keeps its epoch checkpoint) so that the next call resumes
# it while the machine stays warm. Then copies what there is to bring back into $OUT (at most 8
# files of 16 MiB): summary, card, model (when small enough) and the study itself, from which
# `microsearch report` makes the figure and the report on a machine with plotly.
#   bash benchmarks/gpu_campaign.sh [HOURS] [SECONDS] [STUDY]     (defaults: 0.25, 540, cifar10.toml)
# DATA overrides the study's source (default: the packed JPEG images); PYTHON the interpreter that
# has torch (default python3). A rehearsal on a CPU: DATA=synthetic:2000 ... studies/smoke.toml.
set -uo pipefail
cd "$(dirname "$0")/.."
HOURS=${1:-0.25}
SECONDS_LEFT=${2:-540}
STUDY=${3:-studies/cifar10.toml}
PACK=${PACK:-.pack}
RUN=runs/gpu
RESULT=${OUT:-runs/gpu-result}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$PACK"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [ -z "${DATA:-}" ]; then
  DATA="imagefolder:$HOME/data/cifar10-jpeg"
  [ -d ~/data/cifar10-jpeg ] || { mkdir -p ~/data && unzip -q "$PACK/cifar10-jpeg-train.zip" -d ~/data; } || exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU: the campaign runs on the CPU"
timeout --signal=INT --kill-after=60 "$SECONDS_LEFT" \
  "$PYTHON" -m microsearch campaign "$STUDY" --set "data.source='$DATA'" \
  --out "$RUN" --hours "$HOURS"
echo "campaign exit code $?"

mkdir -p "$RESULT"
for f in summary.json final/model_card.json final/model_card.md study.db; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$RESULT/"
done
if [ -f "$RUN/final/model.pt" ] && [ "$(stat -c %s "$RUN/final/model.pt")" -le $((16 * 1024 * 1024)) ]; then
  cp "$RUN/final/model.pt" "$RESULT/"
fi
ls -l "$RESULT"
