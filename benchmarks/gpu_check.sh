#!/usr/bin/env bash
# The GPU check: CUDA tests, both arms trained and evaluated in fp32 and bf16-mixed, training
# and inference speed (mnist-small, resnet50-fpn at 800x1333), bf16's box error; one JSON.
#
#   benchmarks/gpu_check.sh [OUT.json]     from the repository root, on one NVIDIA GPU
#
# Writes OUT.json (default: $OUT/gpu_check.json when $OUT is set, else
# results/gpu/gpu_check.json) and finishes within 8 minutes (the measurements stop starting
# new parts at their budget; what was skipped is listed in the JSON's "skipped").
#
# Offline: the GPU machine's Python must hold torch and torchvision (and, as this project's CUDA
# machines do, lightning, numpy, scipy, opencv-python-headless, pandas, scikit-learn,
# matplotlib, pillow, rich, pyyaml and pytest). The rest is carried as wheels in .wheels/
# (git-ignored), downloaded once on a machine that reaches the package index:
#
#   pip download --no-deps --only-binary=:all: --dest .wheels --implementation cp \
#       --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_24_x86_64 -r benchmarks/gpu_requirements.txt
#
# (about 10 MB; for another Python, change --python-version). The script installs them with
# pip --no-index --find-links .wheels; with no .wheels/ it uses what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JSON=${1:-${OUT:+$OUT/gpu_check.json}}
JSON=${JSON:-results/gpu/gpu_check.json}
mkdir -p "$(dirname "$JSON")"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
started=$(date +%s)

if [ -d .wheels ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links .wheels -r benchmarks/gpu_requirements.txt
fi
"$PYTHON" - <<'PY'
import torch, torchvision, lightning, pycocotools, albumentations, mlxtend  # noqa: F401
assert torch.cuda.is_available(), "no CUDA GPU visible"
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"lightning {lightning.__version__}, {torch.cuda.get_device_name(0)}")
PY

# The CUDA tests (the rest of the suite is the CPU's; here only what needs the GPU).
tests_log=$(dirname "$JSON")/gpu_tests.log
set +e
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py \
    tests/test_fp32_boxes.py tests/test_coordconv.py::test_add_coords_on_cuda >"$tests_log" 2>&1
tests_rc=$?
set -e
tail -3 "$tests_log"

left=$(( 450 - ($(date +%s) - started) ))
timeout $(( left + 30 )) "$PYTHON" benchmarks/gpu_check.py --out "$JSON" --budget-seconds "$left"
"$PYTHON" - "$JSON" "$tests_rc" "$tests_log" <<'PY'
import json, sys
from pathlib import Path
path, code, log = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
results = json.loads(path.read_text())
results["cuda_tests"] = {"exit_code": code, "summary": log.read_text().strip().splitlines()[-1:]}
path.write_text(json.dumps(results, indent=2) + "\n")
print(f"wrote {path} in {results['seconds']} s of measurements; CUDA tests exit {code}")
PY
