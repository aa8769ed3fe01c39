#!/usr/bin/env bash
# GPU tests and benchmarks in calls that each fit the device's 10-minute limit.
#   bash benchmarks/gpu_suite.sh tests      # GPU-marked tests + kernel tests compiled on CUDA
#   bash benchmarks/gpu_suite.sh kernels    # every op vs HF eager math vs inductor (r7b-8L shapes)
#   bash benchmarks/gpu_suite.sh prefill    # r7b-8L prefill B4xS2048: eager, inductor, cohere_fx
#   bash benchmarks/gpu_suite.sh train      # r7b-8L full fine-tune step B2xS2048
#   bash benchmarks/gpu_suite.sh decode     # r7b-8L decode B1, 512 prompt, 128 new
# Several stages may be given; JSON goes to $OUT (or benchmarks/results), logs too, a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
PY
status=0
for stage in "$@"; do
  echo "=== $stage ==="
  case "$stage" in
    tests)   python -m pytest -q -p no:cacheprovider -x tests/test_layer_norm_kernel.py tests/test_qk_norm_rope.py \
               tests/test_cross_entropy.py tests/test_paged_attention.py -m "gpu or not gpu" 2>&1 | tail -15 ;;
    kernels) python -m cohere_fx.bench kernels --out "$out" ;;
    prefill) python -m cohere_fx.bench prefill --out "$out" ;;
    train)   python -m cohere_fx.bench train --mode full --out "$out" ;;
    decode)  python -m cohere_fx.bench decode --batch 1 --out "$out" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
done
exit $status
