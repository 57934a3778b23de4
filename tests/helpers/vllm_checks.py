"""PPO/GRPO runs with `--model.rollout_engine vllm`, and the generation path's `engine="vllm"`, recording what
tests/test_vllm.py asserts on.

    PYTHONPATH=tests python tests/helpers/vllm_checks.py OUT_FILE MODEL_DIR REWARD_DIR ROWS

(tests/ on the path: the flags come from conftest.py, the toy reward from test_ppo.py, the chatty model from
test_generation.py).

vLLM starts a process group and pins torch's threads in the process it runs in, so these runs get a
process of their own. One engine is started by the first run (as `on_fit_start` does) and handed to
the others, which use the same tiny model: starting vLLM is the slow part. The multi-turn run starts it, holding
the longest conversation.
"""

import sys
import types
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LambdaCallback

from lit_rlhf.cli import cli
from lit_rlhf.forward import token_logps
from lit_rlhf.generation import VLLM_ENGINES, engine_key, generate, generate_answers
from lit_rlhf.policy_losses import POLICY_LOSSES
from lit_rlhf.rollout_engines import VLLMMultiTurnRollout, VLLMRollout
from lit_rlhf.vllm_engine import VLLMEngine
from conftest import fit_args, make_tokenizer  # after lit_rlhf, as test_ppo imports it: importing conftest sets HF_* variables
from test_generation import NEW_TOKENS, chatty_lm, left_padded, prompt_ids
from test_multi_turn import ENVIRONMENT_FILE
from test_ppo import ascii_share_score


def vllm_args(model_dir: str, reward_dir: str, rows: str, estimator: str, *extra: str) -> list[str]:
    group = ["--model.num_generations", "4"] if estimator == "grpo" else []
    return fit_args(
        "lit_rlhf.ppo.PPOModule", model_dir, rows, "--model.reward_model_path", reward_dir, "--model.rollout_engine", "vllm",
        "--model.advantage_estimator", estimator, *group, "--model.response_length", "8", "--model.learning_rate", "1e-2",
        "--model.gradient_accumulation_steps", "1", "--data.mode", "prompts", "--data.val_size", "4", "--trainer.precision", "32-true",
        "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1", "--seed_everything", "0", *extra,
    )  # fmt: skip


FIXED = torch.tensor([[256, 257, 104, 105, 33, 32, 119, 111, 114, 108, 100, 258]])  # a sequence scored at every rollout
SEEN: list[tuple[torch.Tensor, torch.Tensor]] = []  # per rollout: the engine's and the trainer's log-probs of FIXED
RUNNING = {}


def recorded_sample(self, *args, **kwargs):
    """`VLLMEngine.sample`, called by the module after its push: first score FIXED with the engine and the trainer."""
    batch = {"input_ids": FIXED, "attention_mask": torch.ones_like(FIXED), "labels": FIXED.masked_fill(torch.arange(12) == 0, -100)}
    SEEN.append((self.sequence_logprobs(FIXED[0].tolist()), token_logps(RUNNING["module"].model, batch)[0, :].detach()))
    return sample(self, *args, **kwargs)


sample, VLLMEngine.sample = VLLMEngine.sample, recorded_sample


def fit(args: list[str], engine=None, score=None):
    """Build the run, hand it `engine` (a started `rollout_engines.VLLMRollout`; None: it starts its own), optionally replace its reward-model `score`, fit:
    the module, its metrics after each step and what SEEN recorded."""
    run = cli(args, run=False)
    steps = []
    run.trainer.callbacks.append(LambdaCallback(on_train_batch_end=lambda trainer, *_: steps.append(
        {k: v.item() for k, v in trainer.callback_metrics.items()})))  # fmt: skip
    module = RUNNING["module"] = run.model
    module.engine = engine
    start = module.engine_class

    def recorded_start(module):  # does starting vLLM leave the run's RNG stream where it was?
        before = torch.get_rng_state()
        started = start(module)
        RUNNING["rng_kept"] = torch.equal(before, torch.get_rng_state())
        return started

    module.engine_class = recorded_start
    if score is not None:
        module.score = types.MethodType(score, module)
    SEEN.clear()
    run.trainer.fit(module, datamodule=run.datamodule)
    return module, steps, SEEN[:]


def multi_turn(model_dir: str, reward_dir: str, rows: str, calls: list) -> tuple[dict, VLLMRollout]:
    """GRPO on conversations with `test_multi_turn.ENVIRONMENT_FILE`'s `Script`, each turn sampled by vLLM (the engine
    starts in on_fit_start, holding prompt + max_rollout_tokens), one step: each turn's ids and log-probs as vLLM
    returned them, the rollout's Samples, the first policy loss's statistics, the step's metrics. -> those, the engine"""
    Path("my_env.py").write_text(ENVIRONMENT_FILE)
    turns, samples = [], []
    policy_turns, sample_conversations = VLLMMultiTurnRollout.policy_turns, VLLMMultiTurnRollout.sample
    VLLMMultiTurnRollout.policy_turns = lambda self, *a: turns.append(policy_turns(self, *a)) or turns[-1]
    VLLMMultiTurnRollout.sample = lambda self, *a: samples.append(sample_conversations(self, *a)) or samples[-1]
    module, metrics, _ = fit(vllm_args(model_dir, reward_dir, rows, "grpo", "--model.environment", "my_env.py:Script", "--model.max_turns", "3",
                                       "--model.response_length", "64", "--model.max_rollout_tokens", "256", "--model.temperature", "1.0",
                                       "--data.limit", "24", "--data.batch_size", "8", "--trainer.limit_train_batches", "1"))  # fmt: skip
    samples = samples[0]
    results = {"turns": turns, "responses": samples.responses, "policy_mask": samples.policy_mask, "sampler_logprobs": samples.sampler_logprobs,
               "response_mask": samples.response_mask, "metrics": metrics, "first_stats": calls[0][1], "rng_kept": RUNNING["rng_kept"]}  # fmt: skip
    return results, module.engine.vllm


def main(out_file: str, model_dir: str, reward_dir: str, rows: str) -> None:
    results = {}
    calls = []
    original, paper = POLICY_LOSSES["ppo"]
    POLICY_LOSSES["ppo"] = (lambda **k: calls.append(original(**k)) or calls[-1], paper)
    # 0. multi-turn, one step: the engine starts in on_fit_start, and the other runs are handed it
    results["multi_turn"], engine = multi_turn(model_dir, reward_dir, rows, calls)
    results["rng_kept"] = results["multi_turn"]["rng_kept"]

    # 1. GRPO, 3 steps
    calls.clear()
    module, metrics, seen = fit(vllm_args(model_dir, reward_dir, rows, "grpo", "--data.limit", "16", "--data.batch_size", "2",
                                          "--trainer.limit_train_batches", "3"), engine=engine)  # fmt: skip
    results["grpo"] = {"metrics": metrics, "first_stats": calls[0][1], "seen": seen}

    # 2. GAE (a value model), one step
    calls.clear()
    module, metrics, seen = fit(vllm_args(model_dir, reward_dir, rows, "gae", "--data.limit", "12", "--data.batch_size", "8",
                                          "--trainer.limit_train_batches", "1", "--model.ppo_epochs", "2"), engine=engine)  # fmt: skip
    results["gae"] = {"metrics": metrics, "first_stats": calls[0][1], "seen": seen}

    # 3. LoRA: pushed merged; the trainer's own model is unmerged after each push
    module, metrics, seen = fit(vllm_args(model_dir, reward_dir, rows, "grpo", "--data.limit", "12", "--data.batch_size", "2",
                                          "--trainer.limit_train_batches", "2", "--model.lora_r", "4"), engine=engine)  # fmt: skip
    merged = [m.merged for m in module.model.modules() if hasattr(m, "merged")]
    results["lora"] = {"metrics": metrics, "seen": seen, "merged": merged}

    # 4. a toy reward: the share of ASCII bytes in the response, learned with vLLM rollouts
    scores = []
    fit(vllm_args(model_dir, reward_dir, rows, "grpo", "--data.limit", "164", "--data.batch_size", "4", "--model.kl_coef", "0.01",
                  "--model.temperature", "1.0", "--model.ppo_epochs", "4", "--trainer.limit_train_batches", "10"),
        engine=engine, score=ascii_share_score(scores))  # fmt: skip
    results["toy_scores"] = scores

    # 5. the one generation path (lit_rlhf/generation.py) through the same engine: test_generation.py's model and prompts
    results["generation"] = generation_path(engine.engine)
    torch.save(results, out_file)


def generation_path(engine: VLLMEngine) -> dict:
    """`generate(engine="hf")` and `generate(engine="vllm")` on test_generation.py's chatty model and prompts (greedy,
    with log-probs), and seeded vLLM samples drawn twice with one seed and once with another. `engine` serves the
    same architecture (2 heads of 32 dims: vLLM's CPU attention needs >= 32): it is handed to the generation path
    instead of a second engine started in this process."""
    tokenizer = make_tokenizer()
    model, batch = chatty_lm(tokenizer, num_attention_heads=2, num_key_value_heads=1, eos_like=165), left_padded(tokenizer)
    VLLM_ENGINES[engine_key(model)] = engine

    def samples(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return [a["response"] for a in generate_answers(model, tokenizer, prompt_ids(tokenizer), NEW_TOKENS, 8, sample=True, engine="vllm")]

    return {"hf": generate(model, batch, tokenizer, NEW_TOKENS, engine="hf", logprobs=True),
            "vllm": generate(model, batch, tokenizer, NEW_TOKENS, engine="vllm", logprobs=True), "samples": [samples(0), samples(0), samples(1)]}  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:5])
