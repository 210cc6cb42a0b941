#!/usr/bin/env bash
# The GPU checks (issue 13), in one call of a few minutes on a machine with a CUDA device:
#   1. tests/test_cuda.py: every method's gradient on CUDA against the plain-autograd reference
#      computed there (float64), bf16 autocast on CUDA against float32, a short training run on the
#      GPU (float32 and --amp bf16) that resumes;
#   2. `robustbp bench --device cuda`: the step cost of every method on the GPU.
# Results go under $OUT (default ./gpu-check): environment.txt, tests-cuda.txt, bench-cuda.txt and
# bench-cuda.json. Run from the repository root:
#     scripts/gpu-check.sh
# Nothing is installed: robustbp runs from this checkout (PYTHONPATH), on the machine's own python3,
# which must hold torch, pytest, numpy, scipy, scikit-learn, matplotlib and tqdm (the device tool's
# nvidia-h100-x1 and nvidia-h200 images hold them all; KINDS.md lists them). The tests and the bench
# use scikit-learn's embedded digits and random images, so no dataset is needed either.
set -uo pipefail
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    "$PYTHON" -c 'import numpy, scipy, sklearn, matplotlib, tqdm, pytest; print("imports ok")'
} 2>&1 | tee "$OUT/environment.txt"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA device")' \
    || exit 1

status=0
timeout 300 "$PYTHON" -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests-cuda.txt" \
    || status=1
timeout 180 "$PYTHON" -m robustbp bench --device cuda --rounds 20 --warmup 5 --json "$OUT/bench-cuda.json" 2>&1 \
    | tee "$OUT/bench-cuda.txt" || status=1
echo "gpu-check: exit status $status" | tee -a "$OUT/environment.txt"
exit $status
