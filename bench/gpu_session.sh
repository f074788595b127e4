#!/usr/bin/env bash
# One GPU call for the serving/cluster measurements (issues 3 and 4), as run by the lead:
#   device run, carry [.whl-serve], command: bash bench/gpu_session.sh
# .whl-serve = ../shared/tools/device-wheelhouse.sh .whl-all all, minus diffusers (Ray Serve + deps),
# plus ftfy and wcwidth (the text encoder requires ftfy): pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl-serve ftfy wcwidth
# Each step has its own time limit, so one slow step cannot take the others' results with it.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-serve/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, ray, transformers; print("torch", torch.__version__, "ray", ray.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
echo "== group of one (NCCL) vs plain path"
timeout 150 python3 bench/group_vs_plain.py 2>&1 | grep -v '^\s*$' | tee "$OUT/group_vs_plain.log" | grep '^{'
echo "== serve graph vs local pipeline"
timeout "${SERVE_LIMIT:-330}" python3 bench/serve_throughput.py --text-layers "${TEXT_LAYERS:-2}" --json "$OUT/serve.json" \
  2>&1 | tee "$OUT/serve.log" | grep '^{'
echo "== done"
