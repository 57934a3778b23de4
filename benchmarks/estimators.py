"""gae, rloo and grpo on the demo's PPO recipe: the same reward model, prompts and step budget, judged side by side.

    python benchmarks/estimators.py --reward-model logs/reward/version_0/hf --judge-model logs/reward/version_1/hf

(the two reward models `lit-rlhf demo` trains: the proxy PPO optimises and the judge). Each
estimator trains in a process of its own from lit_rlhf/configs/demo/ppo.yaml with 8 responses per
PPO step and the same number of PPO steps (`--steps`, 8): `gae` 8 prompts x 1 response, `rloo` and `grpo` 2 prompts
x 4 responses (`grpo` with its KL in the loss, as in its paper). Then one `lit-rlhf evaluate` judges
base and the three policies on the demo's held-out prompts. Prints one markdown table: judge
reward, win-rate against base, sampled KL to base, seconds per PPO step (median after the first),
and peak RSS of the training process. Run it alone on the machine: it measures time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lit_rlhf import evaluate
from lit_rlhf.demo import DEMO_CONFIGS, SHIPPED_ROWS, UNSEEN_ROWS
from lit_rlhf.smollm2 import DEFAULT_DIR
from speed import StepTimer, peak_gib

ESTIMATORS = {
    "gae": [],
    "rloo": ["--model.advantage_estimator", "rloo", "--model.num_generations", "4", "--data.batch_size", "2"],
    "grpo": ["--model.advantage_estimator", "grpo", "--model.num_generations", "4", "--data.batch_size", "2"],
}  # fmt: skip


def fit(estimator: str, model: str, reward_model: str, out_dir: Path, steps: int) -> None:
    """Train one estimator in `out_dir`; print its export folder, seconds per PPO step and peak RSS as JSON."""
    from lit_rlhf.cli import cli

    out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(out_dir)
    run = cli(["-c", str(DEMO_CONFIGS / "ppo.yaml"), "--model.model_name_or_path", model, "--model.reward_model_path", reward_model,
               "--data.dataset", str(SHIPPED_ROWS), "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", str(steps),
               *ESTIMATORS[estimator]], run=False)  # fmt: skip
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    print(json.dumps({"hf": str(Path(run.trainer.log_dir).resolve() / "hf"), "seconds": statistics.median(timer.seconds[1:]),
                      "peak_gib": peak_gib()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_DIR), help="the policy to start from (default: `lit-rlhf fetch-smollm2`'s folder)")
    parser.add_argument("--reward-model", required=True, help="the proxy reward model PPO optimises")
    parser.add_argument("--judge-model", required=True, help="the judge reward model (trained on other rows)")
    parser.add_argument("--steps", type=int, default=8, help="PPO steps of each estimator")
    parser.add_argument("--out", type=Path, default=Path("logs/estimators"), help="where runs and the report go")
    args = parser.parse_args()
    runs = {}
    for estimator in ESTIMATORS:
        command = [sys.executable, __file__, "_fit", estimator, args.model, str(Path(args.reward_model).resolve()),
                   str((args.out / estimator).resolve()), str(args.steps)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{estimator} failed:\n{done.stderr[-3000:]}")
        runs[estimator] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{estimator}: {runs[estimator]['seconds']:.1f} s per PPO step, peak {runs[estimator]['peak_gib']:.1f} GiB", file=sys.stderr)
    models = json.dumps({"base": args.model} | {e: r["hf"] for e, r in runs.items()})
    report = evaluate.main([
        "-c", str(DEMO_CONFIGS / "evaluate.yaml"), "--models", models, "--reward_model", args.reward_model, "--judge_model", args.judge_model,
        "--data.dataset", str(SHIPPED_ROWS), "--unseen_dataset", str(UNSEEN_ROWS), "--output_dir", str(args.out / "evaluate"),
    ])  # fmt: skip
    print("| estimator | responses per step | judge reward | win-rate vs base | KL to base (sampled) | looping | s per PPO step | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for estimator, run in runs.items():
        m = report["models"][estimator]
        interval = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
        shape = "8 prompts x 1" if estimator == "gae" else "2 prompts x 4"
        print(f"| `{estimator}` | {shape} | {interval(m['judge_reward'])} | {interval(m['win_rate'])} | {interval(m['sampled_kl'])} | "
              f"{m['loop_share'][0]:.3f} | {run['seconds']:.1f} | {run['peak_gib']:.1f} GiB |")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fit"]:
        fit(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
