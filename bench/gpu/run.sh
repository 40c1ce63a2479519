#!/usr/bin/env bash
# On the device machine (torch + CUDA image): install the carried wheels, run the learner check.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install --quiet --no-index --no-deps --target .gpu-site .gpu-wheels/*.whl
export PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29533
nvidia-smi --query-gpu=name,memory.total --format=csv
python bench/gpu_learner.py --out "${OUT:-bench/results}" "$@"
