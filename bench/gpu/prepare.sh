#!/usr/bin/env bash
# Wheels the GPU check needs that the device image lacks (../shared/docs/GPU.md): DeepSpeed (built here
# from the project venv), pydantic and friends for Python 3.12 manylinux, and the fused linear-cross-
# entropy kernel. They go to .gpu-wheels/ (ignored by git; carried with `run ... carry=[".gpu-wheels"]`).
# On the device:  bash bench/gpu/run.sh   (installs them into .gpu-site/ and runs bench/gpu_learner.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu-wheels
rm -rf "$out" && mkdir -p "$out"
.venv/bin/pip wheel --quiet --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$out" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection 'typing_extensions>=4.16' hjson \
  cut-cross-entropy liger-kernel pyyaml==6.0.3
ls -la "$out"
du -sh "$out"
