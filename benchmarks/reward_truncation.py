"""Does a reward model tell a whole answer from the same answer cut short, and does ending pay on the policy's
own samples? (docs/results.md, "Why the answers stopped ending")

    python benchmarks/reward_truncation.py REWARD_MODEL [--model-dir DIR] [--policy DIR]

1. Scores the demo's held-out chosen answers longer than 100 tokens (up to 64) whole (ending with EOS) and cut at
   96 and 48 tokens (no EOS), and prints the mean scores and the share of answers scored above their own cut. A
   reward model trained on cut answers prefers the cut; PPO then learns to never end.
2. Samples `--samples` answers to each of `--prompts` training prompts from the policy (default: the base model)
   as the demo's PPO does (the temperature and response length of lit_rlhf/configs/demo/ppo.yaml), scores them,
   and prints the share that ends, the mean score of answers that end and of answers cut at the limit, and,
   over prompts with both kinds, how often an answer that ends outscores one that does not: what a
   missing-EOS penalty has to outweigh.
"""

import argparse

import torch
import yaml

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.demo import DEMO_CONFIGS, SHIPPED_ROWS
from lit_rlhf.evaluate import over_batches
from lit_rlhf.forward import sequence_scores
from lit_rlhf.generation import generate_answers
from lit_rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
from lit_rlhf.smollm2 import DEFAULT_DIR

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("reward_model")
parser.add_argument("--model-dir", default=str(DEFAULT_DIR), help="the tokenizer's model folder")
parser.add_argument("--policy", help="the model whose samples are scored (default: --model-dir)")
parser.add_argument("--prompts", type=int, default=32, help="training prompts sampled")
parser.add_argument("--samples", type=int, default=4, help="answers per prompt")
parser.add_argument("--seed", type=int, default=0)
opts = parser.parse_args()
tokenizer = load_tokenizer(opts.model_dir)
pad_id = tokenizer.pad_token_id
dm = PreferenceDataModule(dataset=str(SHIPPED_ROWS), tokenizer_name_or_path=opts.model_dir, max_length=512, max_prompt_length=64,
                          limit=360, val_size=200)  # fmt: skip
dm.setup("validate")  # the demo's split
rm = load_scalar_model(opts.reward_model, pad_id, trained_head=True).eval()

rows = [r for r in dm.val_rows if len(r["chosen"]) > 100][:64]
scores = {cut: over_batches(sequence_scores, rm, [(r["prompt"], r["chosen"][:cut]) for r in rows], pad_id, 8) for cut in (None, 96, 48)}
print(f"{len(rows)} chosen answers; mean score whole {scores[None].mean():.3f}, cut at 96 {scores[96].mean():.3f}, cut at 48 {scores[48].mean():.3f}")
for cut in (96, 48):
    print(f"whole scored above its {cut}-token cut: {(scores[None] > scores[cut]).float().mean():.3f}")

policy = load_causal_lm(opts.policy or opts.model_dir).eval()
ppo = yaml.safe_load((DEMO_CONFIGS / "ppo.yaml").read_text())["model"]["init_args"]
prompts = [r["prompt"] for r in dm.train_rows[: opts.prompts] for _ in range(opts.samples)]
torch.manual_seed(opts.seed)
answers = generate_answers(policy, tokenizer, prompts, ppo["response_length"], 64, sample=True, temperature=ppo["temperature"])
score = over_batches(sequence_scores, rm, [(p, a["response"]) for p, a in zip(prompts, answers)], pad_id, 16).view(-1, opts.samples)
ended = torch.tensor([a["eos"] for a in answers]).view(-1, opts.samples)  # (prompts, samples)
print(f"{ended.numel()} samples of {opts.prompts} prompts (temperature {ppo['temperature']}, {ppo['response_length']} tokens): {ended.float().mean():.3f} end;"
      f" mean score ended {score[ended].mean():.3f} (n={int(ended.sum())}), cut {score[~ended].mean():.3f} (n={int((~ended).sum())})")
gaps = [a - b for s, e in zip(score, ended) for a in s[e] for b in s[~e]]  # within a prompt: an ended answer's score minus a cut one's
if gaps:
    gaps = torch.stack(gaps)
    print(f"within a prompt, an ended answer outscores a cut one in {(gaps > 0).float().mean():.3f} of {len(gaps)} pairs; mean gap {gaps.mean():.3f}")
