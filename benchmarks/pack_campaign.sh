#!/usr/bin/env bash
# Packs what a bare GPU machine (Python 3.12, torch, no network, no optuna) needs to run
# `microsearch campaign` on the shared JPEG images: the wheels it lacks, for CPython 3.12 on x86_64
# Linux, at the versions installed here; a manifest (name, version, sha256) and the dataset zip.
# The project itself travels as the working tree and is put on PYTHONPATH there (no install that
# could replace that machine's torch). plotly and optuna-dashboard stay behind (13.6 MB): the
# campaign skips its figure and report without them; `microsearch report` makes them here.
#   bash benchmarks/pack_campaign.sh [PACK]          (default .pack, ignored by git; <= 60 MiB)
# Then: the device tool's `carry: [".pack"]` and `bash benchmarks/gpu_campaign.sh` on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:-.pack}
ZIP=../shared/datasets/cifar10-jpeg-train.zip
# The device has markupsafe, pyyaml, packaging, typing-extensions, tqdm, numpy; these it lacks:
NEEDED="optuna sqlalchemy alembic colorlog mako greenlet"
LIMIT=$((60 * 1024 * 1024))

rm -rf "$PACK" && mkdir -p "$PACK/wheels"
for name in $NEEDED; do
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PACK/wheels" "$name==$version"
done
(cd "$PACK/wheels" && sha256sum ./*.whl | sed 's#  \./#  #') > "$PACK/manifest.txt"
cp "$ZIP" "$PACK/"
size=$(du -sb "$PACK" | cut -f1)
echo "$PACK: $size bytes ($((size / 1024 / 1024)) MiB of at most 60)"
sed 's/^/  /' "$PACK/manifest.txt"
ls -l "$PACK" | sed 's/^/  /'
if [ "$size" -gt "$LIMIT" ]; then
  echo "$PACK is larger than 60 MiB" >&2
  exit 1
fi
