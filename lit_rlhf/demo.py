"""`lit-rlhf demo`: the whole pipeline offline on the real SmolLM2-135M-Instruct and the shipped rows."""

import argparse
import json
import time
from pathlib import Path

from lit_rlhf import evaluate
from lit_rlhf.cli import cli
from lit_rlhf.smollm2 import DEFAULT_DIR, fetch_smollm2

DEMO_CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"  # package data: a plain `pip install .` has them
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_ROWS = ASSETS / "human_like_dpo_1k.jsonl"
UNSEEN_ROWS = ASSETS / "dolly_sample.jsonl"


def fit(config: str, *flags: str) -> Path:
    """`lit-rlhf fit -c lit_rlhf/configs/demo/<config> <flags>`; returns the exported model folder."""
    run = cli(["fit", "-c", str(DEMO_CONFIGS / config), *flags])
    return Path(run.trainer.log_dir).resolve() / "hf"


def main(args=None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf demo",
        description="Offline pipeline on 2 CPU cores: fetch SmolLM2-135M-Instruct, train a reward model (the"
        " proxy PPO optimises) and a judge reward model (same recipe, rows no other stage reads), then PPO"
        " and DPO policies on the rows shipped in lit_rlhf/assets, and evaluate base / DPO / PPO side by"
        f" side with the judge. Configs: {DEMO_CONFIGS}. Logs and the report go to ./logs.",
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="where the offline model is kept")
    opts = parser.parse_args(args)
    start = time.time()
    base = str(fetch_smollm2(opts.model_dir))
    data = ("--model.model_name_or_path", base, "--data.dataset", str(SHIPPED_ROWS))
    reward_model = fit("reward.yaml", *data)
    # the judge: the same recipe on the next 360 rows, which no other stage reads
    judge = fit("reward.yaml", *data, "--data.offset", "360")
    ppo_policy = fit("ppo.yaml", *data, "--model.reward_model_path", str(reward_model))
    dpo_policy = fit("dpo.yaml", *data)
    models = json.dumps({"base": base, "dpo": str(dpo_policy), "ppo": str(ppo_policy)})
    evaluate.main([
        "-c", str(DEMO_CONFIGS / "evaluate.yaml"), "--models", models, "--reward_model", str(reward_model), "--judge_model", str(judge),
        "--data.dataset", str(SHIPPED_ROWS), "--unseen_dataset", str(UNSEEN_ROWS), "--output_dir", "logs/evaluate",
    ])  # fmt: skip
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; report: {Path('logs/evaluate/report.md').resolve()}")
