"""Seconds per optimizer step (PPO: per PPO step), tokens/s and peak memory of one trainer on this machine.

    python benchmarks/speed.py dpo --model $(lit-rlhf fetch-smollm2)
    python benchmarks/speed.py ppo --model $(lit-rlhf fetch-smollm2) --reward-model logs/reward/version_0/hf
    python benchmarks/speed.py reward --model $(lit-rlhf fetch-smollm2)
    python benchmarks/speed.py dpo --model $(lit-rlhf fetch-smollm2) --model.lora_r 16   # any further flags

Runs `--steps` training batches through the real Trainer (the first is a warm-up and is not
counted) and prints one markdown table row for the README: seconds per step, real tokens/s, peak
memory (the process's peak resident set size, models and optimizer state included), minor page
faults per step (fresh memory the allocator asked the kernel for) and the precision. Run one benchmark at a time: two
processes on 2 cores slow each other down many times over.
"""

import argparse
import resource
import statistics
import tempfile
import time
from typing import Optional
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import cli
from lit_rlhf.generation import transformers_generate

ROWS = Path(__file__).resolve().parents[1] / "lit_rlhf" / "assets" / "human_like_dpo_1k.jsonl"
SETTINGS = {  # the sizes the README reports
    "reward": ["--model", "lit_rlhf.reward.RewardModule", "--data.batch_size", "8", "--data.max_length", "512"],
    "dpo": ["--model", "lit_rlhf.dpo.DPOModule", "--data.batch_size", "4", "--data.max_length", "512"],
    "ppo": ["--model", "lit_rlhf.ppo.PPOModule", "--data.mode", "prompts", "--data.batch_size", "4",
            "--model.response_length", "128", "--model.ppo_epochs", "4", "--model.gradient_accumulation_steps", "1"],
}  # fmt: skip


def resident_gib() -> float:
    """The process's resident set size now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


def peak_gib() -> float:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StepTimer(L.Callback):
    """Wall time, minor page faults and real (unpadded) tokens of each training batch; resident memory
    when training starts (models, data) and after the first batch (optimizer state allocated)."""

    def __init__(self):
        self.seconds, self.faults, self.tokens, self.shapes, self.ppo_times = [], [], [], [], []

    def on_train_start(self, trainer, module):
        self.start_gib = resident_gib()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.start, self.start_faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self.start)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.start_faults)
        self.ppo_times.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")})  # PPO only
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.shapes.append(tuple(batch["input_ids"].shape))
        if batch_idx == 0:
            self.first_step_gib = resident_gib()


def build_run(algorithm: str, model: str, steps: int, reward_model: Optional[str], extra: list[str]):
    """The Trainer, module and data of one benchmark setting (`SETTINGS`), without logging, checkpoints or export."""
    flags = [*SETTINGS[algorithm], "--model.model_name_or_path", model, "--data.dataset", str(ROWS),
             "--data.limit", "200", "--data.val_size", "8", "--trainer.limit_train_batches", str(steps),
             "--trainer.max_epochs", "1", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tempfile.mkdtemp(), "--seed_everything", "0"]  # fmt: skip
    if reward_model:
        flags += ["--model.reward_model_path", reward_model]
    run = cli(flags + extra, run=False)
    run.model.on_fit_end = lambda: None  # no export: only the steps are measured
    L.seed_everything(0)  # the same PPO samples whatever the flags (LoRA's init draws from the RNG)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("algorithm", choices=SETTINGS)
    parser.add_argument("--model", required=True, help="causal LM folder, hub id or .gguf")
    parser.add_argument("--reward-model", help="reward model folder (PPO)")
    parser.add_argument("--steps", type=int, default=4, help="training batches, the first one a warm-up")
    args, extra = parser.parse_known_args()  # any further lit-rlhf flags, e.g. --model.lora_r 16
    run = build_run(args.algorithm, args.model, args.steps, args.reward_model, extra)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    seconds = statistics.median(timer.seconds[1:])
    # PPO's batch holds prompts only; its step time is reported without a token rate
    rate = "—" if args.algorithm == "ppo" else f"{statistics.median(timer.tokens[1:]) / seconds:.0f}"
    peak = peak_gib()
    setting = " ".join(SETTINGS[args.algorithm][2:] + extra)
    lengths = [t for _, t in timer.shapes[1:]]
    batch = f"{timer.shapes[0][0]} × {min(lengths)}–{max(lengths)}"  # rows × padded length of the timed batches
    faults = statistics.median(timer.faults[1:])
    print(f"| {args.algorithm} | `{setting}` | {batch} | {seconds:.1f} s | {rate} | {peak:.1f} GiB | {faults / 1e3:.0f}k | {run.trainer.precision} |")
    print(f"resident memory: {timer.start_gib:.2f} GiB when training starts (models, data), {timer.first_step_gib:.2f} GiB after"
          f" the first batch (optimizer state allocated), peak {peak:.2f} GiB")
    if args.algorithm == "ppo":
        print_ppo_phases(run, timer, args.model)


def print_ppo_phases(run, timer: StepTimer, model_dir: str) -> None:
    """Median seconds of each PPO phase, and the rollout's generated tokens/s against a plain
    `model.generate` of the same model on the same prompts with the same sampling settings and precision."""
    phase = {k: statistics.median(t[f"time/{k}"] for t in timer.ppo_times[1:]) for k in ("generation", "rollout", "update")}
    rate, update_rate = (statistics.median(t[f"time/{k}_tokens_per_s"] for t in timer.ppo_times[1:]) for k in ("generated", "update"))
    step = phase["rollout"] + phase["update"]
    batch = next(iter(run.datamodule.train_dataloader()))
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hp = run.model.hparams
    start = time.perf_counter()
    with torch.no_grad(), run.trainer.precision_plugin.forward_context():
        _, mask, _ = transformers_generate(plain, batch, run.model.tokenizer, hp.response_length, hp.temperature, 1, synced_gpus=False)
    seconds = time.perf_counter() - start
    print(f"PPO step {step:.1f} s: generation {phase['generation']:.1f} s ({phase['generation'] / step:.0%} of the step), rest of the"
          f" rollout {phase['rollout'] - phase['generation']:.1f} s, update {phase['update']:.1f} s ({update_rate:.0f} real tokens/s,"
          f" every epoch counted: compare with DPO's tokens/s); generated {rate:.0f} tokens/s"
          f" ({run.trainer.precision}); plain model.generate on the same prompts, same precision: {mask.sum().item() / seconds:.0f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
