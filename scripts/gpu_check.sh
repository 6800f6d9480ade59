#!/usr/bin/env bash
# Attention-kernel check on a GPU box (jax with CUDA preinstalled, no network, < 8 minutes):
#   1. the compiled Pallas kernels and the engine on the GPU (tests/test_kernels_gpu.py, 8 processes);
#   2. the benchmark table (scripts/kernel_bench.py), every call in the engine's layout: a stacked
#      [L, Hkv, P, page_size, D] cache read at a traced layer index (--num-layers, default 2); Llama-3-8B heads, and
#      one decode row over DeepSeek-V3's latent cache (16 q heads on one kv head of a 64-wide key and 512-wide latent);
#   3. one mixture-of-experts layer, grouped vs dense experts (scripts/moe_bench.py: model.moe_backend's choice), and
#      int8 experts as XLA runs them vs the Pallas grouped kernel that reads only the experts with rows, and both paths
#      with 4 LoRA adapters of every expert (rank 16: what the experts' adapters cost);
#   4. the projections' matmuls over each weight format (scripts/matmul_bench.py: whether XLA fuses int8/int4/mxfp4/
#      fp8 dequantization into the GEMM, what 4 and 8 bits buy at decode batches, what FP8 and int8 activations buy,
#      FP8 blocks dequantized by XLA against the Pallas kernel that reads them, pallas_kernels/fp8_matmul.py);
#   5. the launch-config sweep at the goal shapes (kernel_bench.py --tune), for tuning the defaults;
#   6. the engine's decode step on the GPU (scripts/bench.py --workload decode on random models with a word-level
#      tokenizer: no model package there): median step, the device's part and the host's, greedy against top-p
#      sampling (the head's filters), for a Llama of 1B's shape and a Qwen3.5-shaped hybrid.
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
# Usage: bash scripts/gpu_check.sh [python]  (default: $PYTHON, else python or python3 on PATH)
#   GPU_CHECK_STEPS="tests bench tune engine" (the default) runs only the steps named, for a second run inside a
#   lease that is short of time; "moe" and "matmul" (steps 3 and 4: run 1 on the H200 has their partial tables),
#   "steps" (the model step at fixed shapes, bench.py --workload steps), "linear" (the linear attention prefill kernel:
#   its GPU tests, scripts/linear_scan_bench.py against the XLA piece loop it replaces, and its tile sweep) and
#   "interpret" (the interpret-mode kernel tests on the CPU) and "transfer" (prompt pages between replicas over JAX's
#   transfer server, scripts/transfer_bench.py) and "sparse" (DeepSeek-V3.2's sparse attention against dense latent
#   attention, scripts/sparse_attention_bench.py) are not in the default: a second run, e.g.
#   GPU_CHECK_STEPS="linear steps transfer sparse", takes them (about 6 minutes).
# Limits: each step's, from its time on an H200 (2026-12-04) plus a margin (the engine step's a guess); 7.75 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-$(command -v python || command -v python3)}}"
STEPS=" ${GPU_CHECK_STEPS:-tests bench tune engine} "
status=0

wanted() { [[ "${STEPS}" == *" $1 "* ]]; }

step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  echo "=== ${name} ($(date -u +%H:%M:%S), limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "${limit}" "$@"
  local rc=$?
  echo "=== ${name}: exit ${rc} after $((SECONDS - start))s"
  [[ ${rc} -eq 0 ]] || status=1
}

"${PY}" -c 'import jax; print("jax", jax.__version__, jax.devices())' || status=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

# The GPU tests spend most of their time compiling (one process: 20 of the 44 in 165 s on an H200): with
# pytest-xdist there, 8 processes share the GPU (each allocating only what it uses) and the 16 cores.
xdist=()
"${PY}" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
wanted tests && step "compiled Pallas kernels and the engine (GPU)" 150 \
  env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false "${PY}" -m pytest tests/test_kernels_gpu.py -q \
    -k "not linear_scan" -p no:cacheprovider -p no:benchmark "${xdist[@]}"
wanted linear && step "linear attention prefill kernel, compiled (GPU)" 90 \
  env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false "${PY}" -m pytest tests/test_kernels_gpu.py -q \
    -k linear_scan -p no:cacheprovider -p no:benchmark "${xdist[@]}"
# Not in the default steps: CI runs these on every change; here they check the image's jax version (82 passed in
# 88 s on jax 0.11.2, 2026-12-04) but beside the GPU tests they starve those of cores.
wanted interpret && step "kernel tests, interpret mode (CPU)" 150 \
  env JAX_PLATFORMS=cpu "${PY}" -m pytest tests/test_kernels.py -q -p no:cacheprovider -p no:benchmark "${xdist[@]}"
export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
wanted bench && step "kernel benchmark (GPU)" 120 "${PY}" scripts/kernel_bench.py --num-layers 2
wanted moe && step "mixture-of-experts layer, grouped vs dense, int8 experts by XLA vs the Pallas grouped kernel, 4 LoRA adapters of the experts (GPU)" 50 \
  "${PY}" scripts/moe_bench.py --tokens 1 64 --reps 5 --lora 4
wanted matmul && step "projection matmuls by weight format: none, int8, w8a8, int4, mxfp4, fp8, w8a8_fp8, fp8 blocks (XLA, kernel) (GPU)" 80 \
  "${PY}" scripts/matmul_bench.py --tokens 1 64 --reps 5
wanted tune && step "launch-config sweep and the small-decode breakdown (GPU)" 75 "${PY}" scripts/kernel_bench.py --num-layers 2 --tune --reps 5
# The engine: 64 sequences decoding 48 tokens after 64-token prompts, bf16, the Pallas kernels, overlapped scheduling.
engine_bench=(scripts/bench.py --workload decode --word-vocab 32768 --decode-batch 64 --output-len 48 --repeats 2
  --set model.dtype=bfloat16 attention.backend=pallas warmup=false scheduler.max_running=64 model.max_model_len=512
  cache.num_pages=2048 --set-b --sampling-b temperature=0.8 top_p=0.9)
wanted engine && step "the engine's decode step, greedy (A) vs top-p (B): Llama 1B-shaped (GPU)" 70 \
  "${PY}" "${engine_bench[@]}" --synthetic-arch llama --synthetic-model 2048,16,32,8,64
wanted engine && step "the engine's decode step, greedy (A) vs top-p (B): Qwen3.5-shaped hybrid (GPU)" 50 \
  "${PY}" "${engine_bench[@]}" --synthetic-arch qwen3_5 --synthetic-model 1024,8,16,4,128
# Not in the default steps (the 8 minutes): the model step alone at fixed decode and prefill shapes, each in the
# program the engine would choose, on Llama- and Qwen3.5-shaped random models (the hybrid's prefill walks its pieces in
# the kernel, pallas_kernels/linear_scan.py, where the xla backend has a loop of dynamic trip count).
steps_bench=(scripts/bench.py --workload steps --word-vocab 32768 --repeats 5 --set model.dtype=bfloat16
  attention.backend=pallas warmup=false cache.num_pages=4096)
# The linear attention layers' prefill: the kernel against the XLA piece loop (one layer, Qwen3.5-9B's and
# Granite-4.0-H-Small's shapes), then its tiles.
wanted linear && step "linear attention prefill, kernel vs the XLA piece loop (GPU)" 60 \
  "${PY}" scripts/linear_scan_bench.py
wanted linear && step "linear attention prefill kernel, tile sweep (GPU)" 40 "${PY}" scripts/linear_scan_bench.py --tune
# Kimi Delta Attention's decay per key channel (XLA on every backend) against a decay per head, Kimi Linear's shapes.
wanted linear && step "KDA's per-channel decays vs per-head ones, XLA loop (GPU)" 40 \
  "${PY}" scripts/linear_scan_bench.py --kda
wanted steps && step "model step times, Llama 1B-shaped (GPU)" 60 \
  "${PY}" "${steps_bench[@]}" --synthetic-arch llama --synthetic-model 2048,16,32,8,64
wanted steps && step "model step times, Qwen3.5-shaped hybrid (GPU)" 60 \
  "${PY}" "${steps_bench[@]}" --synthetic-arch qwen3_5 --synthetic-model 1024,8,16,4,128
# Not in the default steps: prompt pages between replicas over JAX's transfer server (parallel.kv_transfer: jax)
# against a device-to-device copy and a trip through host memory; whether the GPU client moves them at all.
wanted transfer && step "KV pages over the transfer server vs a device copy and host memory (GPU)" 60 \
  "${PY}" scripts/transfer_bench.py --mib 16 256 1024
# Not in the default steps: DeepSeek-V3.2's sparse attention (jnp) against dense latent attention on the kernels.
wanted sparse && step "sparse attention (DeepSeek-V3.2, jnp) vs dense latent attention (Pallas) (GPU)" 60 \
  "${PY}" scripts/sparse_attention_bench.py --dtype bfloat16 --backend pallas --contexts 8192 32768 --reps 5

echo "=== gpu_check: $([[ ${status} -eq 0 ]] && echo PASS || echo FAIL)"
exit ${status}
