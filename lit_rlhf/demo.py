"""`lit-rlhf demo`: the whole pipeline offline on the real SmolLM2-135M-Instruct and the shipped rows."""

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import yaml

from lit_rlhf import evaluate, self_play, tasks
from lit_rlhf.cli import cli
from lit_rlhf.environments import MultiTurn
from lit_rlhf.processes import in_own_process
from lit_rlhf.runs import RunLogger
from lit_rlhf.smollm2 import DEFAULT_DIR, fetch_smollm2

DEMO_CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"  # package data: a plain `pip install .` has them
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_ROWS = ASSETS / "human_like_dpo_1k.jsonl"
UNSEEN_ROWS = ASSETS / "dolly_sample.jsonl"
FINAL_ROWS = ASSETS / "human_like_dpo_final.jsonl"  # the final table's prompts: no stage reads them, no choice was tuned on them


# The demo keeps each stage's exported model only: checkpoints with their AdamW state filled a disk over 3 seeds
# (README), and the demo retrains rather than resumes.
NO_CHECKPOINTS = ("--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0")


#: seconds each stage took in one demo seed on 2 cores with AVX512-BF16 (docs/results.md): the time left is their sum
#: over the stages to come, scaled by how much faster or slower this machine ran the stages so far
STAGE_SECONDS = {"reward": 126, "self-play": 78, "ppo": 360, "dpo": 132, "evaluate base": 41, "evaluate policy": 70}


class Progress:
    """Prints each stage as it starts, with the time spent and an estimate of the time left (stderr)."""

    def __init__(self, expected: list[float]):
        self.expected, self.done, self.start = expected, 0, time.time()  # expected: each stage's seconds on the reference machine

    def next(self, title: str) -> None:
        elapsed, expected = time.time() - self.start, self.expected
        speed = elapsed / sum(expected[: self.done]) if self.done else 1.0  # this machine's seconds per reference second
        left = speed * sum(expected[self.done :])
        print(f"[demo {self.done + 1}/{len(expected)}] {title}: {elapsed / 60:.1f} min so far, about {left / 60:.0f} min left", file=sys.stderr)
        self.done += 1


def fit(config: str, *flags: str) -> Path:
    """`lit-rlhf fit -c lit_rlhf/configs/demo/<config> <flags>` without checkpoints; returns the exported model folder."""
    run = cli(["fit", "-c", str(DEMO_CONFIGS / config), *NO_CHECKPOINTS, *flags])
    return Path(run.trainer.log_dir).resolve() / "hf"


def self_play_args(base: str, output: str) -> list[str]:
    """The flags of `lit-rlhf self-play-pairs` that write the DPO stage's rows to `output`: the shipped rows that dpo.yaml
    reads (its --data.limit), each rejected answer replaced by base's greedy answer at the evaluation's length."""
    limit = yaml.safe_load((DEMO_CONFIGS / "dpo.yaml").read_text())["data"]["limit"]
    return ["--model", base, "--dataset", str(SHIPPED_ROWS), "--output", output, "--limit", str(limit)]


def self_play_rows(base: str) -> str:
    """The DPO stage's rows (`self_play_args`) written to `logs/self_play/version_N/rows.jsonl`; returns the file."""
    output = str(Path(RunLogger("logs", name="self_play").log_dir) / "rows.jsonl")
    self_play.main(self_play_args(base, output))
    return output


def main(args=None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf demo",
        description="Offline pipeline on 2 CPU cores: fetch SmolLM2-135M-Instruct, train a reward model (the"
        " proxy PPO optimises) and a judge reward model (same recipe, rows no other stage reads), then PPO"
        " and DPO policies on the rows shipped in lit_rlhf/assets (once per seed), and evaluate base, DPO and"
        f" PPO side by side with the judge. Configs: {DEMO_CONFIGS}. Logs and the report go to ./logs.",
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="where the offline model is kept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="train PPO and DPO once per seed (--seed_everything"
                        " and --data.shuffle_seed; the held-out split and the reward models stay the same); with several,"
                        " the report adds each metric's mean and spread across seeds")  # fmt: skip
    parser.add_argument("--prompts", choices=["final", "tuning"], default="final", help="final: answer the 128 prompts of"
                        f" {FINAL_ROWS.name}, which no stage reads and no recipe choice was tuned on; tuning: the"
                        " held-out split of the training rows, for trying recipe changes")  # fmt: skip
    opts = parser.parse_args(args)
    start = time.time()
    base = str(fetch_smollm2(opts.model_dir))
    data = ("--model.model_name_or_path", base, "--data.dataset", str(SHIPPED_ROWS))
    t = STAGE_SECONDS
    progress = Progress([t["reward"]] * 2 + [t["self-play"]] + [t["ppo"], t["dpo"]] * len(opts.seeds)
                        + [t["evaluate base"] + 2 * len(opts.seeds) * t["evaluate policy"]])
    progress.next("reward model (the proxy PPO optimises)")
    reward_model = in_own_process(fit, "reward.yaml", *data)
    progress.next("judge reward model (the same recipe on the next 360 rows, which no other stage reads)")
    judge = in_own_process(fit, "reward.yaml", *data, "--data.offset", "360")
    progress.next("DPO's rejected answers: base's own answers to the training prompts (SPIN)")
    dpo_rows = in_own_process(self_play_rows, base)
    policies: dict[str, dict[str, str]] = {"ppo": {}, "dpo": {}}
    for seed in opts.seeds:
        seeded = ("--seed_everything", str(seed), "--data.shuffle_seed", str(seed))
        progress.next(f"PPO, seed {seed}")
        policies["ppo"][str(seed)] = str(in_own_process(fit, "ppo.yaml", *data, *seeded, "--model.reward_model_path", str(reward_model)))
        progress.next(f"DPO, seed {seed}")
        policies["dpo"][str(seed)] = str(in_own_process(fit, "dpo.yaml", "--model.model_name_or_path", base, "--data.dataset", dpo_rows, *seeded))
    progress.next(f"evaluation of base and {2 * len(opts.seeds)} policies")
    name = (lambda recipe, seed: f"{recipe}@{seed}") if len(opts.seeds) > 1 else (lambda recipe, seed: recipe)
    models = {"base": base} | {name(recipe, seed): path for recipe in ("dpo", "ppo") for seed, path in policies[recipe].items()}
    prompts = ["--heldout_dataset", str(FINAL_ROWS), "--prompts", "[]"] if opts.prompts == "final" else []
    in_own_process(evaluate.main, [
        "-c", str(DEMO_CONFIGS / "evaluate.yaml"), "--models", json.dumps(models), "--reward_model", str(reward_model), "--judge_model", str(judge),
        "--data.dataset", str(SHIPPED_ROWS), "--unseen_dataset", str(UNSEEN_ROWS), "--output_dir", "logs/evaluate", *prompts,
    ])  # fmt: skip
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; report: {Path('logs/evaluate/report.md').resolve()}")


#: `demo-verifiable --task`: the `lit-rlhf arithmetic` flags that write it; its config's multi-turn flags, if any, are also
#: task-accuracy's (the evaluation talks to the same tools)
TASKS = {"arithmetic": [], "calculator": ["--ops", "*", "--min_operand", "100", "--max_operand", "999", "--tool", "calculator"]}


def verifiable(args=None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf demo-verifiable",
        description="RL from a verifiable reward, offline on 2 CPU cores: write the task's problems (train and held-out,"
        " never shared), train SmolLM2-135M-Instruct on the training problems with each estimator (rewarded by"
        f" `final_number`, {DEMO_CONFIGS}/<task>.yaml), then measure greedy pass@1 (with the gain over base"
        " and its paired bootstrap interval) and pass@k of base and of each trained policy on the held-out problems.",
    )
    parser.add_argument("--task", choices=list(TASKS), default="arithmetic",
                        help="arithmetic: a + b and a - b, operands 1 to 20; calculator: 3-digit multiplications, in conversations with a calculator tool")  # fmt: skip
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="where the offline model is kept")
    parser.add_argument("--estimators", nargs="+", default=None, help="--model.advantage_estimator of each run (default: grpo and rloo; calculator: grpo)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems judged")
    parser.add_argument("--k", type=int, default=4, help="answers per problem sampled (at the training temperature) for pass@k")
    opts = parser.parse_args(args)
    start, config = time.time(), yaml.safe_load((DEMO_CONFIGS / f"{opts.task}.yaml").read_text())["model"]["init_args"]
    policies, data = {"base": str(fetch_smollm2(opts.model_dir))}, f"logs/{opts.task}"
    tasks.write_arithmetic(["--out", data, "--num_heldout", str(opts.heldout), *TASKS[opts.task]])
    for estimator in opts.estimators or (["grpo"] if config.get("tools") else ["grpo", "rloo"]):
        began = time.time()
        policies[estimator] = str(in_own_process(fit, f"{opts.task}.yaml", "--model.model_name_or_path", policies["base"],
                                                 "--data.dataset", f"{data}/train.jsonl", "--model.advantage_estimator", estimator))  # fmt: skip
        print(f"{estimator}: trained in {(time.time() - began) / 60:.1f} min", file=sys.stderr)
    multi_turn = [flag for field in fields(MultiTurn) if field.name in config for flag in (f"--{field.name}", json.dumps(config[field.name]))]
    in_own_process(tasks.main, ["--models", json.dumps(policies), "--dataset", f"{data}/heldout.jsonl", "--limit", str(opts.heldout),
                                "--k", str(opts.k), "--max_new_tokens", str(config["response_length"]), "--temperature",
                                str(config["temperature"]), "--generation_engine", "auto", *multi_turn])  # fmt: skip
    print(f"demo-verifiable finished in {(time.time() - start) / 60:.1f} min")
