#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks in one script, for a machine with a GPU (run from the
# repository root in an environment with anyformer installed):
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. the tests that need CUDA (FlexAttention paths against the CPU reference for every sparse
#    kind and bias, gradients, bf16 and compiled training) plus the scale-out tests;
# 2. training tokens/s against Hugging Face (GPT-2 small and the Llama shape, fp32 and bf16);
# 3. attention kinds against SDPA at 8k-64k tokens (forward and forward+backward, bf16);
# 4. each step's output and the figures land in OUT_DIR.
set -uo pipefail
out="${1:-gpu_check}"
mkdir -p "$out"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python -m pytest tests/nn/attention/test_flex.py tests/training/test_scale_out.py -p no:cacheprovider -rs 2>&1 | tee "$out/tests.txt" | tail -5
python benchmarks/bench_train.py --device cuda --out "$out/bench_train.json" 2>&1 | tee "$out/bench_train.txt"
anyformer bench attention --device cuda --dtype bfloat16 --causal yes --lengths 8192,16384,32768,65536 \
    --methods "mha[sdpa],mha[chunked],sliding_window,block_local,strided,linear" --max-memory-gb 100 \
    --out "$out/attention" 2>&1 | tee "$out/attention.txt"
anyformer bench attention --device cuda --dtype bfloat16 --causal yes --positional alibi --lengths 8192,16384,32768,65536 \
    --methods "mha[sdpa],mha[chunked]" --max-memory-gb 100 --out "$out/attention_alibi" 2>&1 | tee "$out/attention_alibi.txt"
