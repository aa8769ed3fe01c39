#!/usr/bin/env bash
# GPU tests and benchmarks in calls that each fit the device's 10-minute limit.
#   bash benchmarks/gpu_suite.sh tests      # GPU-marked tests + kernel tests compiled on CUDA (long: a call of its own)
#   bash benchmarks/gpu_suite.sh tests-gpu  # the GPU-marked tests alone (real shapes, compiled models): a short check
#   bash benchmarks/gpu_suite.sh kernels    # every op vs HF eager math vs inductor (r7b-8L shapes)
#   bash benchmarks/gpu_suite.sh sweep      # launch-config sweeps: qk_norm_rope, paged_attention, decode_linear
#   bash benchmarks/gpu_suite.sh sweep-decode  # the decode kernel's sweep alone: decode_linear (over 5 minutes in
#                                           # all: SWEEP_ARGS="--groups down,head --rows 16" takes a part)
#   bash benchmarks/gpu_suite.sh sweep-residual  # decode_residual's launch configs vs the three launches it replaces
#   bash benchmarks/gpu_suite.sh sweep-step # Command-R7B B16 decode steps over configs of the grouped decode_linear
#                                           # launch and decode_residual, in the step (SWEEP_ARGS replaces the list)
#   bash benchmarks/gpu_suite.sh sweep-lora # lora_expand's one-pass backward: launch configs vs the two passes
#   bash benchmarks/gpu_suite.sh sweep-paged  # paged_attention's launch configs alone
#   bash benchmarks/gpu_suite.sh prefill    # r7b-8L prefill B4xS2048: eager, inductor, cohere_fx
#   bash benchmarks/gpu_suite.sh train      # r7b-8L full fine-tune step B2xS2048, with logits and return_logits=false
#   bash benchmarks/gpu_suite.sh decode     # r7b-8L decode B1, 512 prompt, 128 new (decode64: batch 64)
#   bash benchmarks/gpu_suite.sh engine     # the same through cohere_fx.runtime.Engine (paged, CUDA graphs), B1 and B16
#   bash benchmarks/gpu_suite.sh engine-r7b paged  # Command-R7B (32 layers) engine decode; paged_attention at 4k
#   bash benchmarks/gpu_suite.sh engine64   # r7b-8L engine decode, 64 sequences at 2k context
#   bash benchmarks/gpu_suite.sh decode-presets  # engine decode, r7b-8L and Command-R7B, B1 and B16, cohere_fx alone
#   bash benchmarks/gpu_suite.sh lora qlora # r7b-8L LoRA / QLoRA r16 step B2xS2048, return_logits=false (qlora: carry .whl)
#   bash benchmarks/gpu_suite.sh ab-decode  # engine decode with and without rope_kv_write, one run each
#                                           # (r7b-8L B1/B16, Command-R7B B1/B16): what that decode fusion is worth
#   bash benchmarks/gpu_suite.sh ab-residual  # the same with and without decode_residual
#   bash benchmarks/gpu_suite.sh ab-pdl     # decode-presets with COHERE_FX_PDL=1 (programmatic dependent launch),
#                                           # then without: two runs, the knob named in each record
#   bash benchmarks/gpu_suite.sh ab-lora ab-qlora  # LoRA / QLoRA steps with and without lora_shrink + lora_expand,
#                                           # their steps alternated (bench train --interleave)
#   bash benchmarks/gpu_suite.sh ab-tree    # ab-lora here, then in the tree of build/ref.tar (`git archive REF -o
#                                           # build/ref.tar`, REF_GIT=REF): each tree's LoRA step beside its own build
#                                           # without the LoRA ops, so the two ratios compare the trees in one call
#   bash benchmarks/gpu_suite.sh ab-train   # full fine-tune step with and without tied_embedding_grad
#   bash benchmarks/gpu_suite.sh cg-train   # full fine-tune step, return_logits=false, with inductor's CUDA graphs, then
#                                           # without them (two runs, one after the other)
#   bash benchmarks/gpu_suite.sh cg-lora cg-qlora  # ab-lora / ab-qlora with inductor's CUDA graphs (cudagraph trees):
#                                           # set beside ab-lora / ab-qlora, how much of a step is host overhead
#   bash benchmarks/gpu_suite.sh cg-swiglu-lora  # LoRA, then QLoRA steps with inductor's CUDA graphs, with and without
#                                           # swiglu_lora_shrink (ABLATE=<patterns> names what ab-/cg- stages drop)
#   bash benchmarks/gpu_suite.sh sweep-swiglu-lora  # swiglu_lora_shrink's backward configs vs the unfused kernels
# Several stages may be given; JSON goes to $OUT (or benchmarks/results), logs too, a short table last.
# COHERE_FX_GIT=<commit> names the tree in the records: the device's copy of the checkout has a stale .git.
# BENCH_ARGS (e.g. "--passes layer_norm,rope") is appended to every bench command.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The device image cannot build packages offline: put the checkout on the path and register the entry point
# (what `pip install -e .` does) with a dist-info folder, so backend="cohere_fx" resolves without an import.
site=/tmp/cohere_fx_site
mkdir -p "$site/cohere_fx-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: cohere_fx\nVersion: 0.1.0\n' >"$site/cohere_fx-0.1.0.dist-info/METADATA"
printf '[torch_dynamo_backends]\ncohere_fx = cohere_fx.backend:cohere_fx\n' >"$site/cohere_fx-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}"
[ -n "${COHERE_FX_GIT:-}" ] || echo "COHERE_FX_GIT is not set: the records' git field will name the device's stale .git"
python - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
PY
BENCH_ARGS="${BENCH_ARGS:-}"
each_preset() {  # the engine decode of both presets at B1 and B16; extra bench arguments follow
  local preset
  for preset in r7b-8L command-r7b; do
    python -m cohere_fx.bench decode $BENCH_ARGS --preset $preset --engine --batch 1,16 --out "$out" "$@" || return 1
  done
}
CUDAGRAPHS='inductor_config={"triton.cudagraphs": true}'
ab_lora() {  # a LoRA (lora) or QLoRA (qlora) step with and without the patterns in $ABLATE; extra arguments follow
  local mode=$1
  shift
  if [ "$mode" = qlora ]; then  # bitsandbytes is not on the GPU image: carry its wheel in .whl/
    python -m pip install -q --no-index --no-deps --target /tmp/bnb .whl/bitsandbytes-*.whl || return 1
  fi
  PYTHONPATH="/tmp/bnb:$PYTHONPATH" python -m cohere_fx.bench train $BENCH_ARGS --mode "$mode" \
    --option return_logits=false --compare cohere_fx,cohere_fx-ablated --ablate "${ABLATE:-lora_shrink,lora_expand}" \
    --out "$out" "$@"
}
INTERLEAVE=--interleave  # the ab- stages alternate the two systems' steps: the step time drifts within a run
sweep_decode() {
  python benchmarks/sweep_decode_linear.py --out "$out" ${SWEEP_ARGS:-}
}
status=0
for stage in "$@"; do
  echo "=== $stage ==="
  case "$stage" in
    tests)   python -m pytest -q -p no:cacheprovider --tb=line -rf tests/test_layer_norm_kernel.py tests/test_qk_norm_rope.py \
               tests/test_cross_entropy.py tests/test_paged_attention.py tests/test_gpu_model.py tests/test_swiglu.py \
               tests/test_parallel_residual.py tests/test_decode_runner.py tests/test_peft_lora.py tests/test_embedding.py tests/test_engine.py \
               tests/test_decode_linear.py tests/test_decode_residual.py tests/test_dependent_launch.py \
               tests/test_rope_kv_write.py tests/test_lora_ops.py 2>&1 | tee "$out/tests.log" | tail -40 ;;
    tests-gpu) python -m pytest -q -p no:cacheprovider --tb=short -rf -m gpu tests 2>&1 | tee "$out/tests-gpu.log" | tail -40 ;;
    kernels) python -m cohere_fx.bench kernels $BENCH_ARGS --out "$out" &&
             # LayerNorm at hidden 8192 ([8192, 8192]: Command R / R+ widths)
             python -m cohere_fx.bench kernels $BENCH_ARGS --preset command-r --layers 1 --kernels layer_norm --out "$out" ;;
    ce)      python -m pytest -q -s -p no:cacheprovider --tb=short tests/test_cross_entropy.py -k h100 2>&1 | tee "$out/ce.log" | tail -25 ;;
    ln8k)    python -m cohere_fx.bench kernels $BENCH_ARGS --preset command-r --layers 1 --kernels layer_norm --out "$out" ;;
    sweep)   python benchmarks/sweep_qk_norm_rope.py | tee "$out/sweep-qk_norm_rope.txt" &&
             python benchmarks/sweep_paged_attention.py | tee "$out/sweep-paged_attention.txt" && sweep_decode &&
             python benchmarks/sweep_lora.py | tee "$out/sweep-lora.txt" ;;
    sweep-decode) sweep_decode ;;
    sweep-residual) python benchmarks/sweep_decode_residual.py --out "$out" ;;
    sweep-step) python benchmarks/sweep_decode_step.py --out "$out" ${SWEEP_ARGS:---grouped 16,256,4,3,0 16,128,4,2,0 \
               16,512,4,2,0 32,256,4,2,0 32,256,4,3,0 --single 32,256,4,3,0 16,256,4,4,0 64,256,4,4,0} ;;
    sweep-lora) python benchmarks/sweep_lora.py | tee "$out/sweep-lora.txt" ;;
    sweep-paged) python benchmarks/sweep_paged_attention.py | tee "$out/sweep-paged_attention.txt" ;;
    prefill) python -m cohere_fx.bench prefill $BENCH_ARGS --out "$out" ;;
    train)   python -m cohere_fx.bench train $BENCH_ARGS --mode full --out "$out" &&
             python -m cohere_fx.bench train $BENCH_ARGS --mode full --compare inductor,cohere_fx --option return_logits=false --out "$out" ;;
    decode)  python -m cohere_fx.bench decode $BENCH_ARGS --batch 1 --out "$out" ;;
    engine)  # beside HF eager, HF static cache + compile and HF's own continuous batching (hf-cb)
             python -m cohere_fx.bench decode $BENCH_ARGS --engine --batch 1 --compare eager,inductor,hf-cb,cohere_fx \
               --out "$out" &&
             python -m cohere_fx.bench decode $BENCH_ARGS --engine --batch 16 --compare eager,hf-cb,cohere_fx \
               --out "$out" ;;
    engine-r7b) # full Command-R7B architecture (Cohere2, 32 layers, random weights), issue 5's B1 / B16 targets
             python -m cohere_fx.bench decode $BENCH_ARGS --preset command-r7b --engine --batch 1,16 \
               --compare hf-cb,cohere_fx --out "$out" ;;
    paged)   # paged_attention vs the gather + repeat_kv + SDPA it replaces: 16 sequences of 4096 tokens
             python -m cohere_fx.bench kernels $BENCH_ARGS --kernels paged_attention --batch 16 --seq 4096 --out "$out" ;;
    decode-presets) each_preset --compare cohere_fx ;;  # issue 5's rate targets, the default backend alone
    decode64) python -m cohere_fx.bench decode $BENCH_ARGS --batch 64 --iters 2 --warmup 0 --out "$out" ;;
    engine64) # issue 5's batch-64 bandwidth target: 64 sequences at 2k context through the Engine
             python -m cohere_fx.bench decode $BENCH_ARGS --engine --batch 64 --prompt 2048 --compare cohere_fx \
               --iters 2 --warmup 1 --out "$out" ;;
    lora)    python -m cohere_fx.bench train $BENCH_ARGS --mode lora --option return_logits=false --out "$out" ;;
    qlora)   # bitsandbytes is not on the GPU image: carry its wheel in .whl/ (see BENCHMARKS.md)
             python -m pip install -q --no-index --no-deps --target /tmp/bnb .whl/bitsandbytes-*.whl &&
             PYTHONPATH="/tmp/bnb:$PYTHONPATH" python -m cohere_fx.bench train $BENCH_ARGS --mode qlora --option return_logits=false --out "$out" ;;
    ab-decode) each_preset --compare cohere_fx,cohere_fx-ablated --ablate rope_kv_write ;;
    ab-residual) each_preset --compare cohere_fx,cohere_fx-ablated --ablate decode_residual ;;
    ab-pdl)  COHERE_FX_PDL=1 each_preset --compare cohere_fx && each_preset --compare cohere_fx ;;
    ab-train) python -m cohere_fx.bench train $BENCH_ARGS --mode full --compare cohere_fx,cohere_fx-ablated \
               --ablate tied_embedding_grad $INTERLEAVE --out "$out" ;;
    cg-train) python -m cohere_fx.bench train $BENCH_ARGS --mode full --compare cohere_fx --option return_logits=false \
               --option "$CUDAGRAPHS" --out "$out" &&
             python -m cohere_fx.bench train $BENCH_ARGS --mode full --compare cohere_fx --option return_logits=false \
               --out "$out" ;;
    ab-lora) ab_lora lora $INTERLEAVE ;;
    ab-qlora) ab_lora qlora $INTERLEAVE ;;
    ab-tree) ref=/tmp/cohere_fx_ref && rm -rf "$ref" && mkdir -p "$ref" && tar -xf build/ref.tar -C "$ref" &&
             ab_lora lora $INTERLEAVE &&
             (here=$PWD && cd "$ref" && ln -s "$here/.whl" .whl 2>/dev/null
              OUT="$out" COHERE_FX_GIT="${REF_GIT:-}" bash benchmarks/gpu_suite.sh ab-lora) ;;
    cg-lora) ab_lora lora --option "$CUDAGRAPHS" ;;
    cg-qlora) ab_lora qlora --option "$CUDAGRAPHS" ;;
    cg-swiglu-lora) ABLATE=swiglu_lora_shrink ab_lora lora --option "$CUDAGRAPHS" &&
             ABLATE=swiglu_lora_shrink ab_lora qlora --option "$CUDAGRAPHS" ;;
    sweep-swiglu-lora) python benchmarks/sweep_swiglu_lora_shrink.py --out "$out" ${SWEEP_ARGS:-} ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
done
exit $status
