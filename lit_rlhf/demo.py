"""`lit-rlhf demo`: the whole pipeline offline on the real SmolLM2-135M-Instruct and the shipped rows."""

import argparse
import time
from pathlib import Path

from lit_rlhf.smollm2 import DEFAULT_DIR, fetch_smollm2

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = REPO / "configs" / "demo"
SHIPPED_ROWS = Path(__file__).resolve().parent / "assets" / "human_like_dpo_1k.jsonl"


def fit(config: str, *flags: str) -> Path:
    """`lit-rlhf fit -c configs/demo/<config> <flags>`; returns the exported model folder."""
    from lit_rlhf.cli import cli

    run = cli(["fit", "-c", str(DEMO_CONFIGS / config), *flags])
    return Path(run.trainer.log_dir).resolve() / "hf"


def main(args=None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf demo",
        description="Offline pipeline on 2 CPU cores: fetch SmolLM2-135M-Instruct, train a reward model,"
        " then PPO and DPO policies, on the rows shipped in lit_rlhf/assets. Logs go to ./logs.",
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="where the offline model is kept")
    opts = parser.parse_args(args)
    start = time.time()
    base = str(fetch_smollm2(opts.model_dir))
    data = ("--model.model_name_or_path", base, "--data.dataset", str(SHIPPED_ROWS))
    reward_model = fit("reward.yaml", *data)
    dpo_policy = fit("dpo.yaml", *data)
    print(f"\nbase model: {base}\nreward model: {reward_model}\nDPO policy: {dpo_policy}")
    print(f"demo finished in {(time.time() - start) / 60:.1f} min")
