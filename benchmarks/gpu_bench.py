"""The GPU benchmark's two halves (`benchmarks/gpu.sh` calls both):

    python benchmarks/gpu_bench.py models OUT_DIR          # SmolLM2-135M (offline copy) and a random-init 360M, each with a reward model
    python benchmarks/gpu_bench.py run SETTING MODEL_DIR   # one setting; prints one JSON line
    python benchmarks/gpu_bench.py table RESULTS.jsonl     # the JSON lines as one markdown table

Settings: reward, dpo, ppo-hf, ppo-vllm, grpo-hf, grpo-vllm (`SETTINGS`), in bf16, `--steps` training
batches each, the first a warm-up. Per setting: trained tokens/s (real tokens through the trained
model's forward and backward, every PPO epoch counted), generated tokens/s (PPO, GRPO), model FLOPs
utilisation and peak GPU memory.

MFU = 6 * N * trained tokens/s / the GPU's peak dense bf16 FLOP/s (`PEAK_TFLOPS`, or the environment
variable GPU_PEAK_TFLOPS): N the trained model's parameters, forward and backward counted, the forward-only
passes (reference, reward model, generation) not. It is the usual training MFU (PaLM, Chowdhery et al. 2022,
appendix B, without the attention term), comparable between settings of one model, not a hardware figure.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = Path(__file__).resolve().parents[1] / "lit_rlhf" / "assets" / "human_like_dpo_1k.jsonl"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0, "A6000": 155.0}  # dense bf16, vendor data sheets  # fmt: skip
SIZE_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5)
PPO = ["--model", "lit_rlhf.ppo.PPOModule", "--data.mode", "prompts", "--data.batch_size", "8", "--model.response_length", "128",
       "--model.ppo_epochs", "2", "--model.gradient_accumulation_steps", "2"]  # fmt: skip
GRPO = ["--model.advantage_estimator", "grpo", "--model.num_generations", "8", "--data.batch_size", "4"]
SETTINGS = {
    "reward": ["--model", "lit_rlhf.reward.RewardModule", "--data.batch_size", "16", "--data.max_length", "512"],
    "dpo": ["--model", "lit_rlhf.dpo.DPOModule", "--data.batch_size", "8", "--data.max_length", "512"],
    "ppo-hf": PPO, "ppo-vllm": [*PPO, "--model.rollout_engine", "vllm"],
    "grpo-hf": [*PPO, *GRPO], "grpo-vllm": [*PPO, *GRPO, "--model.rollout_engine", "vllm"],
}  # fmt: skip
COLUMNS = ["model", "setting", "trained tok/s", "generated tok/s", "MFU", "peak GPU memory", "s/step"]


def make_models(out_dir: Path) -> None:
    """`smollm2-135m` (the offline copy) and `random-360m` (SmolLM2-360M's shape, random weights), each with a
    reward model beside it (`<name>-reward`: its backbone and a new scalar head): no hub download."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from lit_rlhf.smollm2 import fetch_smollm2

    smollm2 = fetch_smollm2()
    config = AutoConfig.from_pretrained(smollm2)
    config.update(SIZE_360M)
    torch.manual_seed(0)
    for name, model in (("smollm2-135m", AutoModelForCausalLM.from_pretrained(smollm2)), ("random-360m", AutoModelForCausalLM.from_config(config))):
        model.save_pretrained(out_dir / name)
        AutoTokenizer.from_pretrained(smollm2).save_pretrained(out_dir / name)
        AutoModelForSequenceClassification.from_pretrained(out_dir / name, num_labels=1).save_pretrained(out_dir / f"{name}-reward")
        AutoTokenizer.from_pretrained(smollm2).save_pretrained(out_dir / f"{name}-reward")


def peak_tflops() -> float | None:
    """The GPU's peak dense bf16 TFLOP/s: GPU_PEAK_TFLOPS, else from its name; None if unknown."""
    import os

    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def run_setting(setting: str, model_dir: Path, steps: int) -> dict:
    """Fit `steps` batches of `setting` and measure it (the first batch not counted)."""
    import lightning as L

    from lit_rlhf.cli import cli

    flags = [*SETTINGS[setting], "--model.model_name_or_path", str(model_dir), "--data.dataset", str(ROWS), "--data.limit", "400",
             "--data.val_size", "8", "--trainer.limit_train_batches", str(steps), "--trainer.max_epochs", "1",
             "--trainer.precision", "bf16-mixed", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tempfile.mkdtemp(), "--seed_everything", "0"]  # fmt: skip
    if setting.startswith(("ppo", "grpo")):
        flags += ["--model.reward_model_path", f"{model_dir}-reward"]
    run = cli(flags, run=False)
    run.model.on_fit_end = lambda: None  # no export: only the steps are measured
    steps_seen = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")}
            steps_seen.append({"seconds": time.perf_counter() - self.start, "tokens": int(batch["attention_mask"].sum()), **metrics})

    run.trainer.callbacks.append(Timer())
    torch.cuda.reset_peak_memory_stats()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    timed = steps_seen[1:]
    seconds = statistics.median(s["seconds"] for s in timed)
    if "time/update" in timed[0]:  # PPO, GRPO: every epoch's rollout tokens go through the trained model
        trained = statistics.median(s["time/update_tokens_per_s"] * s["time/update"] for s in timed) / seconds
        generated = statistics.median(s["time/generated_tokens_per_s"] for s in timed)
    else:
        trained, generated = statistics.median(s["tokens"] for s in timed) / seconds, None
    parameters = sum(p.numel() for p in run.model.model.parameters())
    tflops = peak_tflops()
    return {
        "model": model_dir.name, "setting": setting, "trained_tokens_per_s": trained, "generated_tokens_per_s": generated,
        "mfu": 6 * parameters * trained / (tflops * 1e12) if tflops else None, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "seconds_per_step": seconds, "gpu": torch.cuda.get_device_name(),
    }  # fmt: skip


def table(lines: list[str]) -> str:
    """The results (JSON lines; anything else, e.g. a setting's error output, is skipped) as one markdown table."""
    rows = []
    for line in lines:
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(result, dict) or "setting" not in result:
            continue
        generated = result["generated_tokens_per_s"]
        rows.append([result["model"], result["setting"], f"{result['trained_tokens_per_s']:.0f}", "—" if generated is None else f"{generated:.0f}",
                     "—" if result["mfu"] is None else f"{result['mfu']:.1%}", f"{result['peak_gib']:.1f} GiB", f"{result['seconds_per_step']:.2f}"])  # fmt: skip
    if not rows:
        raise SystemExit("no result to tabulate: every setting failed (see the log above)")
    return "\n".join("| " + " | ".join(row) + " |" for row in [COLUMNS, ["---"] * len(COLUMNS), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models").add_argument("out_dir", type=Path)
    one = commands.add_parser("run")
    one.add_argument("setting", choices=SETTINGS)
    one.add_argument("model_dir", type=Path)
    one.add_argument("--steps", type=int, default=5)
    commands.add_parser("table").add_argument("results", type=Path)
    args = parser.parse_args()
    if args.command == "models":
        make_models(args.out_dir)
    elif args.command == "run":
        print(json.dumps(run_setting(args.setting, args.model_dir, args.steps)), flush=True)
    else:
        print(table(args.results.read_text().splitlines()))


if __name__ == "__main__":
    sys.exit(main())
