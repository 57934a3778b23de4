"""Where a training step's time goes, from torch.profiler: the share of the LM head + log-softmax,
attention, the reference forward, the backward pass, the optimizer and the rest.

    python benchmarks/step_profile.py dpo --model $(lit-rlhf fetch-smollm2)
    python benchmarks/step_profile.py reward --model $(lit-rlhf fetch-smollm2) --trainer.precision 32-true

Runs the benchmark setting of `benchmarks/speed.py` (same rows, batch size and max length) for
`--steps` steps and profiles the last one (the first ones warm up). The regions are inclusive wall
times of labelled calls: `ops.label_logps` (the LM head and log-softmax over the vocabulary, forward;
its recomputation in the backward pass counts under backward), the reference model's forward
(DPO), attention (`scaled_dot_product_attention` calls and their backward), the whole forward
(`training_step`), `backward`, and the optimizer step (torch's `Optimizer.step#AdamW.step` label,
less the forward and backward Lightning runs inside it). Minor page
faults of the step are counted too (fresh memory the allocator asked the kernel for).
"""

import argparse
import resource
import time

import lightning as L
from torch.profiler import ProfilerActivity, profile, record_function

import lit_rlhf.dpo
import lit_rlhf.forward
from speed import SETTINGS, build_run

REGIONS = {"forward (training_step)": "training_step", "LM head + log-softmax (forward)": "label_logps",
           "reference forward": "reference_forward", "backward": "backward"}  # fmt: skip


def labelled(fn, label: str):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


class ProfileLastStep(L.Callback):
    """Profiles the last training batch, backward and optimizer step included."""

    def __init__(self, steps: int):
        self.steps, self.profiler = steps, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.steps - 1:
            self.faults, self.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            self.profiler = profile(activities=[ProfilerActivity.CPU]).__enter__()

    def on_before_backward(self, trainer, module, loss):
        if self.profiler:
            self.backward = record_function("backward").__enter__()

    def on_after_backward(self, trainer, module):
        if self.profiler:
            self.backward.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.profiler:
            self.profiler.__exit__(None, None, None)
            self.seconds = time.perf_counter() - self.start
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("algorithm", choices=[a for a in SETTINGS if a != "ppo"])
    parser.add_argument("--model", required=True, help="causal LM folder, hub id or .gguf")
    parser.add_argument("--steps", type=int, default=3, help="training batches; the last one is profiled")
    args, extra = parser.parse_known_args()
    lit_rlhf.forward.label_logps = labelled(lit_rlhf.forward.label_logps, "label_logps")
    lit_rlhf.dpo.DPOModule.live_reference_logps = labelled(lit_rlhf.dpo.DPOModule.live_reference_logps, "reference_forward")
    run = build_run(args.algorithm, args.model, args.steps, None, extra)
    run.model.training_step = labelled(run.model.training_step, "training_step")
    profiler = ProfileLastStep(args.steps)
    run.trainer.callbacks.append(profiler)
    run.trainer.fit(run.model, datamodule=run.datamodule)

    events = profiler.profiler.key_averages()
    total = profiler.seconds
    inclusive = {e.key: e.cpu_time_total / 1e6 for e in events}  # seconds, summed over calls
    rows = {name: inclusive.get(key, 0.0) for name, key in REGIONS.items()}
    # torch labels each optimizer step; Lightning runs forward and backward inside it (the closure)
    rows["optimizer step"] = inclusive.get("Optimizer.step#AdamW.step", 0.0) - rows["forward (training_step)"] - rows["backward"]
    rows["attention, forward"] = inclusive.get("aten::scaled_dot_product_attention", 0.0)
    rows["attention, backward"] = sum(t for k, t in inclusive.items() if "scaled_dot_product" in k and k.endswith("_backward"))
    print(f"{args.algorithm}, {run.trainer.precision}, step {total:.1f} s, {profiler.faults / 1e3:.0f}k minor page faults")
    print("| region | seconds | share of the step |\n| --- | --- | --- |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:8]
    print("\nops by self time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} s" for e in top))


if __name__ == "__main__":
    main()
