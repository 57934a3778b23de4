"""Does a reward model tell a whole answer from the same answer cut short? (docs/results.md, "Why the answers
stopped ending")

    python benchmarks/reward_truncation.py REWARD_MODEL [--model-dir DIR]

Scores the demo's held-out chosen answers longer than 100 tokens (up to 64) whole (ending with EOS) and cut at 96
and 48 tokens (no EOS), and prints the mean scores and the share of answers scored above their own cut. A
reward model trained on cut answers prefers the cut; PPO then learns to never end.
"""

import argparse

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.demo import SHIPPED_ROWS
from lit_rlhf.evaluate import over_batches
from lit_rlhf.forward import sequence_scores
from lit_rlhf.models import load_scalar_model, load_tokenizer
from lit_rlhf.smollm2 import DEFAULT_DIR

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("reward_model")
parser.add_argument("--model-dir", default=str(DEFAULT_DIR), help="the tokenizer's model folder")
opts = parser.parse_args()
tokenizer = load_tokenizer(opts.model_dir)
dm = PreferenceDataModule(dataset=str(SHIPPED_ROWS), tokenizer_name_or_path=opts.model_dir, max_length=512, max_prompt_length=64,
                          limit=360, val_size=200)  # fmt: skip
dm.setup("validate")  # the demo's held-out split
rm = load_scalar_model(opts.reward_model, tokenizer.pad_token_id, trained_head=True).eval()
rows = [r for r in dm.val_rows if len(r["chosen"]) > 100][:64]
scores = {cut: over_batches(sequence_scores, rm, [(r["prompt"], r["chosen"][:cut]) for r in rows], tokenizer.pad_token_id, 8)
          for cut in (None, 96, 48)}  # fmt: skip
print(f"{len(rows)} chosen answers; mean score whole {scores[None].mean():.3f}, cut at 96 {scores[96].mean():.3f}, cut at 48 {scores[48].mean():.3f}")
for cut in (96, 48):
    print(f"whole scored above its {cut}-token cut: {(scores[None] > scores[cut]).float().mean():.3f}")
