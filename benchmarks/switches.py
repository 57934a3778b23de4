"""GRPO against its successors' switches on the verifiable arithmetic task: the demo's budget, 2 seeds each.

    python benchmarks/switches.py --out logs/switches          # about an hour on 2 cores; run it alone

Each switch set trains SmolLM2-135M-Instruct from lit_rlhf/configs/demo/arithmetic.yaml (`lit-rlhf
demo-verifiable`'s GRPO recipe: 18 batches of 4 training problems x 8 answers, 48 tokens, temperature 0.7), with
the set's flags (`SWITCHES`) and `COMMON`'s, once per seed, each in a process and folder of its own
(OUT/<set>-<seed>/). Then one `lit-rlhf task-accuracy` pass measures greedy pass@1 of base and of every policy on
the held-out problems (`lit-rlhf arithmetic`: train and held-out never share a problem), and OUT/switches.md
gets one row per run: pass@1 with its bootstrap interval, its gain over base and over GRPO of the same seed (paired
bootstrap: the per-problem differences resampled together), wall time of the training process, PPO steps, batches of prompts sampled (dynamic sampling samples more
batches of the same training problems for a step), the share of flat groups among those sampled (no signal for a group estimator) and the mean entropy per token over the
last 3 steps; then the mean of each set over its seeds.

`COMMON` splits each batch into 2 minibatches: with one update per batch (the demo recipe) the policy that is
updated is the one that sampled, every ratio is 1 and no clip range, ratio or weight does anything, so GSPO would
be GRPO and CISPO token-mean REINFORCE. A run with an `hf` folder is not trained again: the same command resumes.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_rlhf import tasks
from lit_rlhf.demo import DEMO_CONFIGS, NO_CHECKPOINTS
from lit_rlhf.metrics import bootstrap_ci, interval_text
from lit_rlhf.smollm2 import DEFAULT_DIR, fetch_smollm2

COMMON = ["--model.num_minibatches", "2"]
SWITCHES = {
    "grpo": [],
    # DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-mean loss, overlong masking and soft punishment
    "dapo": ["--model.cliprange_high", "0.28", "--model.dynamic_sampling_max_rounds", "2", "--model.loss_aggregation", "token_mean",
             "--model.mask_truncated_completions", "true", "--model.reward_funcs", "[final_number, soft_overlong_punishment]"],
    # GSPO (Zheng et al. 2025) with its paper's clip ranges
    "gspo": ["--model.policy_loss", "gspo", "--model.cliprange", "3e-4", "--model.cliprange_high", "4e-4"],
    # CISPO (MiniMax-M1 2025): the weight bounded above only, tokens averaged over the batch as in its eq. 4
    "cispo": ["--model.policy_loss", "cispo", "--model.cliprange", "1", "--model.cliprange_high", "0.28", "--model.loss_aggregation", "token_mean"],
}  # fmt: skip


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar the run logged to TensorBoard, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train(name: str, seed: int, model: str, problems: Path, out: Path) -> dict:
    """Switch set `name` trained with `seed` in OUT/<name>-<seed>/ (unless done): its export folder, wall time and statistics."""
    folder = out / f"{name}-{seed}"
    done = folder / "run.json"  # the training's wall time, once trained
    if not done.is_file():
        done.write_text(json.dumps({"seconds": trained(name, seed, model, problems, folder)}))
    run_dir = max((folder / "logs/ppo").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    logged = scalars(run_dir)
    flat = logged.get("rollout/flat_group_share", logged["rewards/flat_group_share"])  # of every group sampled
    return json.loads(done.read_text()) | {
        "hf": str(run_dir.resolve() / "hf"), "steps": len(logged["objective/entropy_per_token"]), "flat_group_share": statistics.mean(flat),
        "batches": sum(logged.get("rollout/sampling_rounds", [1.0] * len(flat))),  # dynamic sampling samples more
        "entropy_end": statistics.mean(logged["objective/entropy_per_token"][-3:]),
    }  # fmt: skip


def trained(name: str, seed: int, model: str, problems: Path, folder: Path) -> float:
    """Train switch set `name` with `seed` in `folder`; the wall time of its process (s)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["lit-rlhf", "fit", "-c", str(DEMO_CONFIGS / "arithmetic.yaml"), *NO_CHECKPOINTS, "--model.model_name_or_path", model,
               "--data.dataset", str(problems.resolve()), "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
               *COMMON, *SWITCHES[name]]  # fmt: skip
    began = time.time()
    with open(folder / "fit.log", "w") as log:
        if subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"{name} seed {seed} failed: see {folder / 'fit.log'}")
    return time.time() - began


def table(runs: dict[tuple[str, int], dict], report: dict) -> str:
    """One row per run and one mean per switch set (markdown)."""
    base = report["base"]["greedy_passes"]
    lines = ["| set | seed | greedy pass@1 [95 % CI] | gain over base [paired 95 % CI] | gain over grpo [paired 95 % CI] | training wall time | steps | batches sampled | flat groups sampled | entropy per token, last 3 steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    means = {}
    for (name, seed), run in runs.items():
        passes = report[f"{name}-{seed}"]["greedy_passes"]
        over = {ref: bootstrap_ci(torch.tensor(passes) - torch.tensor(other)) for ref, other in
                (("base", base), ("grpo", report[f"grpo-{seed}"]["greedy_passes"]))}
        versus_grpo = "" if name == "grpo" else interval_text(over["grpo"])
        lines.append(f"| {name} | {seed} | {interval_text(report[f'{name}-{seed}']['greedy'])} | {interval_text(over['base'])} | {versus_grpo} |"
                     f" {run['seconds'] / 60:.1f} min | {run['steps']} | {run['batches']:.0f} | {run['flat_group_share']:.2f} | {run['entropy_end']:.3f} |")  # fmt: skip
        means.setdefault(name, []).append((over["base"][0], run["seconds"] / 60))
    lines += ["", "| set | mean gain over base (seeds) | mean training wall time |", "| --- | --- | --- |"]
    for name, values in means.items():
        gains = [g for g, _ in values]
        lines.append(f"| {name} | {statistics.mean(gains):+.3f} ({', '.join(f'{g:+.3f}' for g in gains)}) | {statistics.mean(m for _, m in values):.1f} min |")
    return "\n".join(lines) + f"\n\nGreedy answers of at most 48 tokens on {report['base']['problems']} held-out problems, {report['base']['generation_precision']} weights."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the policy to start from (default: `lit-rlhf fetch-smollm2`'s folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--sets", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems judged")
    parser.add_argument("--out", type=Path, default=Path("logs/switches"))
    args = parser.parse_args()
    if "grpo" not in args.sets:
        parser.error("--sets needs grpo: every other set is compared with it")
    model = args.model or str(fetch_smollm2(DEFAULT_DIR))
    tasks.write_arithmetic(["--out", str(args.out / "arithmetic"), "--num_heldout", str(args.heldout)])
    runs = {}
    for seed in args.seeds:
        for name in args.sets:
            runs[name, seed] = train(name, seed, model, args.out / "arithmetic/train.jsonl", args.out)
            print(f"{name} seed {seed}: {runs[name, seed]['seconds'] / 60:.1f} min", file=sys.stderr)
    models = {"base": model} | {f"{name}-{seed}": run["hf"] for (name, seed), run in runs.items()}
    report = tasks.task_accuracy(models, str(args.out / "arithmetic/heldout.jsonl"), limit=args.heldout, k=1, max_new_tokens=48,
                                 temperature=0.7, generation_engine="auto")  # fmt: skip
    text = table(runs, report)
    (args.out / "switches.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
