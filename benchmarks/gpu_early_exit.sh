#!/usr/bin/env bash
# Issue 5's GPU check, as one script (about 3 minutes on an H200): the static decoder's
# CUDA graphs against eager decoding and Transformers on tiny float32 models, then the
# 7B-shaped sweep (random Mistral-7B-v0.3 shape, bf16, 250 prompts x 7 depths x 64
# tokens) with the static decoder and, as the same-machine baseline, Transformers'
# forward. Needs only torch, transformers and pytest (no `pip install` of safetylab).
#
#   bash benchmarks/gpu_early_exit.sh            # from the repository root, on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
$PY - <<'PYEOF' || true
# Which attention kernel serves the decode step's shape (7B: 8 key heads x 4 queries, 128 columns)?
import torch
q = torch.randn(250, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(250, 8, 128, 128, device="cuda", dtype=torch.bfloat16)
mask = torch.zeros(250, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
choice = torch._fused_sdp_choice(q, k, k, attn_mask=mask)
print("SDPA backend for the decode step:", torch.nn.attention.SDPBackend(choice).name)
PYEOF
echo "== decoder tests (CUDA graphs vs eager, static vs Transformers) =="
$PY -m pytest -q -p no:cacheprovider tests/test_lm_decode.py tests/test_lm_generate.py
ARGS="--random-arch mistral-7b --device cuda --dtype bfloat16"
echo "== 7B-shaped sweep, static decoder with CUDA graphs =="
$PY benchmarks/early_exit.py $ARGS --essay-prompts 3
echo "== same sweep, Transformers' forward (baseline on this machine) =="
$PY benchmarks/early_exit.py $ARGS --essay-prompts 1 --decoder hf --mixed
