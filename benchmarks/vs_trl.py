"""This project and TRL side by side: the same model, rows, batch size and max length, one after the other.

    pip install -e ".[bench]"        # TRL, pinned
    python benchmarks/vs_trl.py dpo --model $(lit-rlhf fetch-smollm2)
    python benchmarks/vs_trl.py reward --model $(lit-rlhf fetch-smollm2) --check-model logs/reward/version_0/hf

Each library trains `--steps` optimizer steps (the first a warm-up, not counted) in a process of its
own, so each peak RSS is that library's alone, in two modes:
- `defaults`: each library as a user gets it (this project: the machine's precision and its
  gradient checkpointing default; TRL: its config's defaults, `use_cpu=True` on a CPU);
- `matched`: TRL with this project's precision and gradient checkpointing.
Both read the first 200 shipped rows (lit_rlhf/assets/human_like_dpo_1k.jsonl) as chat messages.

Tokens are counted where both libraries do the same work: a forward pre-hook on the trained model's
backbone (the LlamaModel inside the policy or reward model) adds up, per training step, the real
tokens (attention mask) and the padded tokens (batch x length) of its forwards with gradients
(not the reference's). Printed per library:
seconds per optimizer step (median), real and padded tokens/s, peak RSS, and the loss both compute
on the file's first batch of rows at the start, in fp32, with no training (`--check-model`: the
weights to start from there: a trained reward model, so both score heads are the same; for DPO a
trained policy, with `--model` as its reference, so the loss is not simply log 2).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from speed import ROWS, build_run, peak_gib

NUM_ROWS = 200
SIZES = {"reward": {"batch_size": 8, "max_length": 512}, "dpo": {"batch_size": 4, "max_length": 512}}


class Steps:
    """Wall time, real and padded tokens of each optimizer step, from a hook on the trained backbone."""

    def __init__(self, backbone):
        self.seconds, self.real, self.padded = [], [], []
        backbone.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("attention_mask") is not None:  # the trained forward, not a reference's
            self.real[-1] += int(kwargs["attention_mask"].sum())
            self.padded[-1] += kwargs["attention_mask"].numel()

    def begin(self):
        self.real.append(0)
        self.padded.append(0)
        self.start = time.perf_counter()

    def end(self):
        self.seconds.append(time.perf_counter() - self.start)

    def summary(self) -> dict:
        seconds = statistics.median(self.seconds[1:])
        return {"seconds": seconds, "real_tps": statistics.median(self.real[1:]) / seconds,
                "padded_tps": statistics.median(self.padded[1:]) / seconds}  # fmt: skip


def backbone(model):
    return getattr(model, model.base_model_prefix)


def rows_as_messages(n: int) -> list[dict]:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()[:n]]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]  # fmt: skip


# ---------------------------------------------------------------- this project


def lit_run(algorithm: str, model: str, steps: int, precision: str | None, checkpointing: bool | None, *extra: str):
    """`benchmarks/speed.py`'s run of `algorithm` (the same rows, batch size and max length as SIZES), its
    precision and checkpointing set only where given."""
    flags = list(extra)
    if precision:
        flags += ["--trainer.precision", precision]
    if checkpointing is not None:
        flags += ["--model.gradient_checkpointing", str(checkpointing).lower()]
    return build_run(algorithm, model, steps, None, flags)


def lit_start_loss(algorithm: str, model: str, reference: str) -> float:
    """The module's loss on the file's first batch of rows, fp32, before any training (DPO: against `reference`)."""
    from lit_rlhf.data import collate_pairs

    run = lit_run(algorithm, model, 1, "32-true", None, *(["--model.ref_model_name_or_path", reference] if algorithm == "dpo" else []))
    run.datamodule.setup("fit")
    rows = sorted(run.datamodule.train_rows + run.datamodule.val_rows, key=lambda r: r["index"])[: SIZES[algorithm]["batch_size"]]
    with torch.no_grad():
        return run.model.shared_step(collate_pairs(rows, run.datamodule.tokenizer.pad_token_id), "val").item()


def run_lit(algorithm: str, model: str, steps: int, precision: str | None, checkpointing: bool | None) -> dict:
    import lightning as L

    run = lit_run(algorithm, model, steps, precision, checkpointing)
    steps_timer = Steps(backbone(run.model.model))

    class Timer(L.Callback):
        def on_train_batch_start(self, *args):
            steps_timer.begin()

        def on_train_batch_end(self, *args):
            steps_timer.end()

    run.trainer.callbacks.append(Timer())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return steps_timer.summary() | {"precision": run.trainer.precision, "checkpointing": run.model.hparams.gradient_checkpointing}


# ---------------------------------------------------------------- TRL


def trl_trainer(algorithm: str, model: str, steps: int, overrides: dict, reference: str | None = None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    size = SIZES[algorithm]
    config_class, trainer_class = {"reward": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer)}[algorithm]
    args = config_class(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=size["batch_size"], max_length=size["max_length"],
        max_steps=steps, report_to="none", save_strategy="no", logging_strategy="no", seed=0, use_cpu=True, **overrides,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    extra = {"ref_model": AutoModelForCausalLM.from_pretrained(reference)} if reference else {}
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows_as_messages(NUM_ROWS)), processing_class=tokenizer, **extra)
    return trainer, TrainerCallback


def trl_start_loss(algorithm: str, model: str, reference: str) -> dict:
    """TRL's loss on the file's first batch of rows, fp32, before any training: on its own tokens, and on
    this project's (each completion cut after its end-of-turn token, where TRL keeps the template's "\n")."""
    trainer, _ = trl_trainer(algorithm, model, 1, {"bf16": False}, reference if algorithm == "dpo" else None)
    rows = [trainer.train_dataset[i] for i in range(SIZES[algorithm]["batch_size"])]
    eos = trainer.processing_class.eos_token_id
    cut = [{k: v[: v.index(eos) + 1] if k.endswith("_ids") and k != "prompt_ids" and eos in v else v for k, v in row.items()} for row in rows]
    trainer.model.eval()
    with torch.no_grad():
        return {"own tokens": trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item(),
                "cut after EOS": trainer.compute_loss(trainer.model, trainer.data_collator(cut)).item()}  # fmt: skip


def run_trl(algorithm: str, model: str, steps: int, precision: str | None, checkpointing: bool | None) -> dict:
    overrides = {} if precision is None else {"bf16": precision == "bf16-mixed"}
    if checkpointing is not None:
        overrides["gradient_checkpointing"] = checkpointing
    trainer, TrainerCallback = trl_trainer(algorithm, model, steps, overrides)
    steps_timer = Steps(backbone(trainer.model))

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            steps_timer.begin()

        def on_step_end(self, *args, **kwargs):
            steps_timer.end()

    trainer.add_callback(Timer())
    trainer.train()
    return steps_timer.summary() | {"precision": "bf16-mixed" if trainer.args.bf16 else "32-true", "checkpointing": trainer.args.gradient_checkpointing}


# ---------------------------------------------------------------- the comparison


def measure(library: str, algorithm: str, model: str, steps: int, mode: str, settings: dict | None = None) -> dict:
    """Run one library in a fresh process; `settings` (matched mode): precision and checkpointing to use."""
    command = [sys.executable, __file__, "_one", library, algorithm, "--model", model, "--steps", str(steps), "--mode", mode]
    if settings:
        command += ["--settings", json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode:
        sys.exit(f"{library} {algorithm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one(args) -> None:
    settings = json.loads(args.settings) if args.settings else {}
    run = {"lit": run_lit, "trl": run_trl}[args.library]
    result = run(args.algorithm, args.model, args.steps, settings.get("precision"), settings.get("checkpointing"))
    print(json.dumps(result | {"peak_gib": peak_gib()}))


def start_losses(args) -> None:
    loss = {"lit": lit_start_loss, "trl": trl_start_loss}[args.library](args.algorithm, args.check_model, args.model)
    print(json.dumps({"loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algorithm", choices=SIZES)
    parser.add_argument("--model", required=True, help="causal LM folder (SmolLM2-135M-Instruct: `lit-rlhf fetch-smollm2`)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per library, the first a warm-up")
    parser.add_argument("--modes", default="defaults,matched", help="comma-separated: defaults, matched")
    parser.add_argument("--check-model", help="weights for the start-loss check (default: --model); DPO: the policy, --model the reference")
    args = parser.parse_args()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    from lit_rlhf.precision import BF16_CPU_FLAGS, cpu_flags

    print(f"{args.algorithm}, batch {SIZES[args.algorithm]['batch_size']}, max length {SIZES[args.algorithm]['max_length']}, "
          f"{NUM_ROWS} rows; CPU {cpu}, {os.cpu_count()} cores, bf16 flags: {sorted(cpu_flags() & set(BF16_CPU_FLAGS)) or 'none'}\n")  # fmt: skip
    print("| mode | library | precision | checkpointing | s/step | real tok/s | padded tok/s | peak RSS | speed ratio | memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        lit = measure("lit", args.algorithm, args.model, args.steps, mode)
        settings = {"precision": lit["precision"], "checkpointing": lit["checkpointing"]} if mode == "matched" else None
        trl = measure("trl", args.algorithm, args.model, args.steps, mode, settings)
        for name, r in (("lit-rlhf", lit), ("TRL", trl)):
            ratio = f"{lit['real_tps'] / trl['real_tps']:.2f}x" if name == "lit-rlhf" else ""
            memory = f"{lit['peak_gib'] / trl['peak_gib']:.2f}x" if name == "lit-rlhf" else ""
            print(f"| {mode} | {name} | {r['precision']} | {r['checkpointing']} | {r['seconds']:.1f} | {r['real_tps']:.0f} | "
                  f"{r['padded_tps']:.0f} | {r['peak_gib']:.1f} GiB | {ratio} | {memory} |", flush=True)  # fmt: skip
    check = args.check_model or args.model
    losses = {}
    for library in ("lit", "trl"):
        command = [sys.executable, __file__, "_loss", library, args.algorithm, "--model", args.model, "--check-model", check]
        done = subprocess.run(command, capture_output=True, text=True)
        losses[library] = json.loads(done.stdout.strip().splitlines()[-1])["loss"] if not done.returncode else done.stderr[-500:]
    print(f"\nstart loss on the first {SIZES[args.algorithm]['batch_size']} rows (fp32, weights {check}, reference {args.model}): "
          f"lit-rlhf {losses['lit']}, TRL {losses['trl']}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_one", "_loss"):
        inner = argparse.ArgumentParser()
        inner.add_argument("command")
        inner.add_argument("library")
        inner.add_argument("algorithm")
        inner.add_argument("--model")
        inner.add_argument("--steps", type=int)
        inner.add_argument("--mode")
        inner.add_argument("--settings")
        inner.add_argument("--check-model")
        parsed = inner.parse_args()
        one(parsed) if parsed.command == "_one" else start_losses(parsed)
    else:
        main()
