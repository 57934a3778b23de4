"""Generated tokens per second of each generation engine on this machine, against its compute and memory limits.

    python benchmarks/generation.py                       # SmolLM2-135M (lit-rlhf fetch-smollm2), about 6 minutes alone
    python benchmarks/generation.py --full                # every engine at every size and dtype (longer)
    python benchmarks/generation.py --engines hf vllm --dtypes bf16 --batch-sizes 64 --new-tokens 128

Every row of a batch generates exactly N new tokens (EOS forbidden until then: `min_new_tokens`), greedy,
from chat-formatted prompts of lit_rlhf/assets/human_like_dpo_1k.jsonl (the first B, left-padded), so
every engine does the same work. tokens/s = B * N / wall time of the call (prompt prefill included,
vLLM's start and one warm-up call not). The engines:

- `hf-generate`: `model.generate`, dynamic cache (what every caller used before lit_rlhf/generation.py);
- `hf`: lit_rlhf/generation.py's own decode loop (`generate(..., engine="hf")`);
- `vllm`: lit_rlhf/generation.py's vLLM engine (`engine="vllm"`), its weights pushed at every call as callers do.

Each engine and dtype runs in a process of its own (its peak resident memory is its own; vLLM pins
torch's threads). The compute limit: the model's FLOPs per token (2 x its parameters: 0.27 GFLOP for
the 135M model, attention's own FLOPs left out) against a large matmul's TFLOP/s measured here in that
dtype. The memory limit: each decoding step reads every weight once for the whole batch and each row's
cached keys and values (on average prompt + N/2 positions), at the read bandwidth measured here (a sum
over 1 GiB); at batch 64 on two cores it is the lower of the two. Prints a markdown table with the CPU, its bf16 flags and the load average before and after (other
processes on the cores slow every engine; run it alone).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = Path(__file__).resolve().parents[1] / "lit_rlhf" / "assets" / "human_like_dpo_1k.jsonl"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ENGINES = ("hf-generate", "hf", "vllm")


def matmul_tflops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """TFLOP/s of (size x size) @ (size x size) matmuls in `dtype`, repeated for about `seconds`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12


def read_gb_per_s(gib: int = 1, seconds: float = 2.0) -> float:
    """Memory read bandwidth: GB/s of summing a `gib` GiB fp32 tensor, repeated for about `seconds`."""
    x = torch.ones(gib * 2**28)
    x.sum()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        x.sum()
        n += 1
    return x.numel() * 4 * n / (time.perf_counter() - start) / 1e9


def cpu_description() -> str:
    """The CPU's model name and whether it has bf16 matmul units (lit_rlhf.precision's flags)."""
    from lit_rlhf.precision import BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in (*BF16_CPU_FLAGS, "avx512f", "amx_tile"))
    return f"{name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads; {present}"


def prompt_batch(tokenizer, batch_size: int) -> dict[str, torch.Tensor]:
    """The first `batch_size` prompts of the shipped rows, chat-formatted, left-padded: input_ids, attention_mask (B, P)."""
    from lit_rlhf.data import collate_prompts
    from lit_rlhf.tokenization import render_prompt, tokenize

    rows = [json.loads(line) for line in ROWS.read_text().splitlines()[:batch_size]]
    prompts = [{"prompt": tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]))} for r in rows]
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def generator(engine: str, model, tokenizer):
    """A function (prompts batch, N) -> the B x N new tokens of `engine`."""
    from lit_rlhf.generation import generate

    if engine == "hf-generate":
        def run(batch, n):  # fmt: skip
            out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            return out[:, batch["input_ids"].shape[1] :]
        return run
    return lambda batch, n: generate(model, batch, tokenizer, n, min_new_tokens=n, engine=engine)[0]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def worker(spec: dict) -> list[dict]:
    """One engine in one dtype over `spec`'s cells (batch size, new tokens): one result dict per cell."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_rlhf.generation import started_vllm

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=DTYPES[spec["dtype"]]).eval()
    start = time.perf_counter()
    if spec["engine"] == "vllm":
        started_vllm(model, tokenizer, "vllm")
    start_seconds = time.perf_counter() - start
    run = generator(spec["engine"], model, tokenizer)
    run(prompt_batch(tokenizer, 2), 4)  # warm-up
    config, results = model.config, []
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    for batch_size, new_tokens in spec["cells"]:
        batch = prompt_batch(tokenizer, batch_size)
        start = time.perf_counter()
        tokens = run(batch, new_tokens)
        seconds = time.perf_counter() - start
        assert tokens.shape == (batch_size, new_tokens), tokens.shape  # every row did the same work
        results.append({"engine": spec["engine"], "dtype": spec["dtype"], "batch": batch_size, "new_tokens": new_tokens,
                        "tokens_per_s": batch_size * new_tokens / seconds, "seconds": seconds, "peak_rss_gib": peak_rss_gib(),
                        "start_s": start_seconds, "flops_per_token": 2 * sum(p.numel() for p in model.parameters()),
                        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "prompt_length": batch["input_ids"].shape[1],
                        "kv_bytes_per_position": kv_bytes * DTYPES[spec["dtype"]].itemsize})  # fmt: skip
    return results


def plan(args) -> list[dict]:
    """The (engine, dtype) processes to run and their cells. By default every size for the machine's own generation
    dtype (`precision.generation_precision`), the other dtype at the largest batch and fewest tokens only, and
    `hf-generate` (the slowest engine) at the fewest tokens or the largest batch; `--full` runs everything."""
    from lit_rlhf.precision import generation_precision

    grid = [(b, n) for b in args.batch_sizes for n in args.new_tokens]
    own = generation_precision()
    specs = []
    for dtype in args.dtypes:
        for engine in args.engines:
            cells = grid
            if not args.full and dtype != own:
                cells = [(max(args.batch_sizes), min(args.new_tokens))]
            elif not args.full and engine == "hf-generate":
                cells = [(b, n) for b, n in grid if n == min(args.new_tokens) or b == max(args.batch_sizes)]
            specs.append({"engine": engine, "dtype": dtype, "cells": cells, "model": args.model, "threads": args.threads})
    return specs


def run_worker(spec: dict) -> list[dict]:
    """`worker(spec)` in a fresh process: its peak memory is its own."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"{spec['engine']} {spec['dtype']} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_limit(result: dict, gb_per_s: float) -> float:
    """Tokens/s if every decoding step of `result`'s cell only read the weights once and each row's keys and values."""
    positions = result["prompt_length"] + result["new_tokens"] / 2  # cached per row, on average over the steps
    step_bytes = result["weight_bytes"] + result["batch"] * positions * result["kv_bytes_per_position"]
    return result["batch"] * gb_per_s * 1e9 / step_bytes


def table(results: list[dict], tflops: dict[str, float], gb_per_s: float) -> str:
    """The markdown table: one row per cell, with the speed-up over `hf-generate` in the same cell and dtype."""
    baseline = {(r["dtype"], r["batch"], r["new_tokens"]): r["tokens_per_s"] for r in results if r["engine"] == "hf-generate"}
    lines = ["| engine | dtype | batch | new tokens | tokens/s | vs hf-generate | share of the compute limit | share of the memory limit | peak RSS (GiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        base = baseline.get((r["dtype"], r["batch"], r["new_tokens"]))
        limit = tflops[r["dtype"]] * 1e12 / r["flops_per_token"]  # tokens/s
        speedup = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:.0f} | {speedup} | "
                     f"{100 * r['tokens_per_s'] / limit:.0f} % of {limit:.0f} | {100 * r['tokens_per_s'] / memory_limit(r, gb_per_s):.0f} % of "
                     f"{memory_limit(r, gb_per_s):.0f} | {r['peak_rss_gib']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--model", help="a causal LM folder (default: SmolLM2-135M-Instruct from `lit-rlhf fetch-smollm2`)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--full", action="store_true", help="every engine at every size in every dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the HF engines (default: torch's, one per core)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.model is None:
        from lit_rlhf.smollm2 import fetch_smollm2

        args.model = str(fetch_smollm2())
    began, load_before = time.time(), os.getloadavg()[0]
    tflops, gb_per_s = {name: matmul_tflops(DTYPES[name]) for name in args.dtypes}, read_gb_per_s()
    results = [r for spec in plan(args) for r in run_worker(spec)]
    print(f"CPU: {cpu_description()}")
    print("matmul (2048^3) TFLOP/s measured here: " + ", ".join(f"{name} {value:.2f}" for name, value in tflops.items()) + f"; memory read {gb_per_s:.1f} GB/s")
    print(f"model: {args.model}; load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {time.time() - began:.0f} s in all")
    starts = {r["dtype"]: r["start_s"] for r in results if r["engine"] == "vllm"}
    print("vLLM start (s, not counted): " + (", ".join(f"{dtype} {seconds:.0f}" for dtype, seconds in starts.items()) or "-"))
    print()
    print(table(results, tflops, gb_per_s))


if __name__ == "__main__":
    main()
