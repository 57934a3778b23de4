"""Seconds per PPO step of TRL 0.19.1's `PPOTrainer` on CPU, for a side-by-side with this project's PPO.

    python -m venv --system-site-packages /work/trl019env
    /work/trl019env/bin/pip install "trl==0.19.1" "transformers==4.53.3"
    /work/trl019env/bin/python benchmarks/trl_ppo.py --model $(lit-rlhf fetch-smollm2) \
        --reward-model logs/reward/version_0/hf [--steps 3]

What it measures: TRL's own `PPOTrainer.train()` loop, unchanged, with the settings of this project's
PPO recipe (configs/ppo.yaml): 16 prompts per rollout (per-device batch 4 x gradient accumulation 4,
one minibatch), 128-token responses sampled at temperature 0.7, 4 PPO epochs, KL coefficient 0.05
(k1), stop at EOS, no evaluation, no checkpoints; `--precision bf16` (TRL's default: accelerate
autocasts the prepared policy-and-value model, so the update runs in bf16 while generation and the
reference and reward forwards stay fp32) or `fp32`. One TRL "update" (its loop's unit) is one
PPO step: one rollout of 16 prompts (generation, reference log-probs, values, scores, GAE) and then
`num_ppo_epochs` passes over it, each one optimizer step over 4 micro-batches of 4. `--steps` updates
run; the first is a warm-up and is not counted. Policy and reference are the `--model` causal LM,
reward and value models the `--reward-model` sequence classifier (num_labels 1), all loaded
separately, as TRL's example script does. Prompts: the first `--rows` rows of
lit_rlhf/assets/human_like_dpo_1k.jsonl, each `prompt` rendered by the tokenizer's chat template as
one user message with the generation prompt, tokenized and cut to its last `--max-prompt-length`
tokens; TRL's data loader shuffles them (seeded) and left-pads each batch.

Printed at the end, as one JSON line on stdout: the median seconds per PPO step after the first,
its split into generation / rest of the rollout / update (timed by wrapping TRL's module-level
`batch_generation` and spotting the update's first forward with gradients), generated tokens
(up to and including the first EOS, as this project counts them) per second of generation, the
process's peak RSS (ru_maxrss: models, logits kept by generation and optimizer state included),
torch's thread count, the versions of trl/transformers/torch and every setting. Per-step TRL
metrics go to stderr.

Why a separate virtualenv: TRL removed `PPOTrainer` after 0.19.x, and 0.19.1 needs
transformers < 4.54, while this project needs transformers >= 4.56 (5.x on this machine). A venv
with `--system-site-packages` reuses the system's torch (check `pip install --dry-run` first: it must
not pull another torch; if it wants one, add the installed `torch==X` to the same command) and
shadows only transformers, trl and their hub/tokenizers pins, leaving the main environment as it is.

Model folders written by transformers 5 do not load as they are in 4.53: this script copies each
folder's small files into a temporary folder (weights are symlinked, nothing is written to the
original) and patches them there: config.json's `rope_parameters` back to `rope_theta` (+
`rope_scaling` when it is not the default rope) and `dtype` to `torch_dtype`; tokenizer_config.json's
`tokenizer_class` `TokenizersBackend` (unknown to 4.53) to `PreTrainedTokenizerFast`, and its
`extra_special_tokens` list (a dict in 4.53) to `additional_special_tokens`.

Run it alone: two benchmarks on 2 cores slow each other down many times over.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
import trl

if not trl.__version__.startswith("0.19.") or not transformers.__version__.startswith("4."):
    raise SystemExit(f"trl_ppo.py: error: needs trl 0.19.x with transformers 4.x (found trl {trl.__version__},"
                     f" transformers {transformers.__version__}); run it with the venv's python (see this file's docstring)")  # fmt: skip

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

ROWS = Path(__file__).resolve().parents[1] / "lit_rlhf" / "assets" / "human_like_dpo_1k.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
V5_ONLY_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


# ---------------------------------------------------------------- transformers 5 folder -> 4.53


def patch_config(config: dict) -> list[str]:
    """Make a transformers 5 config.json readable by 4.53; returns what was changed."""
    changes = []
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
            changes.append(f"rope_theta={rope['rope_theta']} (from rope_parameters)")
        rope.pop("rope_theta", None)
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = rope
            changes.append(f"rope_scaling={rope}")
    if isinstance(config.get("rope_scaling"), dict) and "rope_theta" in config["rope_scaling"]:
        scaling = dict(config["rope_scaling"])
        config.setdefault("rope_theta", scaling.pop("rope_theta"))
        config["rope_scaling"] = None if scaling.get("rope_type", scaling.get("type", "default")) == "default" else scaling
        changes.append("rope_theta moved out of rope_scaling")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config.pop("dtype")
        changes.append("dtype -> torch_dtype")
    return changes


def patch_tokenizer_config(config: dict) -> list[str]:
    """Make a transformers 5 tokenizer_config.json readable by 4.53; returns what was changed."""
    changes = []
    known = hasattr(transformers, str(config.get("tokenizer_class")))
    if not known:
        changes.append(f"tokenizer_class {config.get('tokenizer_class')} -> PreTrainedTokenizerFast")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x: a list of extra special tokens; 4.53: a dict of named ones
        config.pop("extra_special_tokens")
        additional = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
        changes.append("extra_special_tokens list -> additional_special_tokens")
    for key in V5_ONLY_TOKENIZER_KEYS:
        if config.pop(key, None) is not None:
            changes.append(f"dropped {key}")
    return changes


def patched_copy(src: str, dst: Path) -> tuple[str, list[str]]:
    """A copy of model folder `src` in `dst` with the 4.53 patches: small files copied, weights symlinked."""
    src_path = Path(src).expanduser().resolve()
    if not (src_path / "config.json").is_file():
        raise SystemExit(f"trl_ppo.py: error: {src} is not a model folder (no config.json)")
    dst.mkdir(parents=True)
    for item in src_path.iterdir():
        if item.is_dir():
            continue
        if item.name.endswith(WEIGHT_SUFFIXES):
            (dst / item.name).symlink_to(item)
        else:
            shutil.copy2(item, dst / item.name)
    changes = []
    for name, patch in (("config.json", patch_config), ("tokenizer_config.json", patch_tokenizer_config)):
        path = dst / name
        if path.is_file():
            data = json.loads(path.read_text())
            changed = patch(data)
            if changed:
                path.write_text(json.dumps(data, indent=2))
                changes += [f"{name}: {c}" for c in changed]
    return str(dst), changes


# ---------------------------------------------------------------- prompts


def prompt_dataset(tokenizer, rows: int, max_prompt_length: int) -> Dataset:
    """TRL's PPO format: one `input_ids` column, each the chat-rendered prompt cut to its last tokens."""
    lines = ROWS.read_text().splitlines()[:rows]
    input_ids = []
    for line in lines:
        messages = [{"role": "user", "content": json.loads(line)["prompt"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.append(ids[-max_prompt_length:])
    return Dataset.from_dict({"input_ids": input_ids})


# ---------------------------------------------------------------- timing


class StepTimer(TrainerCallback):
    """Wall time of each PPO update (TRL calls `on_step_end` once per update) and where it goes.

    Generation is timed by wrapping `trl.trainer.ppo_trainer.batch_generation`; the update starts at
    the loop's first `forward` with gradients enabled (the rollout's forwards run under no_grad).
    """

    def __init__(self, ppo_module, eos_id: int):
        self.eos_id = eos_id
        self.seconds, self.generation, self.rollout, self.update = [], [], [], []
        self.generated_tokens, self.prompt_lengths = [], []
        self.start = self.update_start = None
        self.generation_seconds = 0.0
        self.tokens = 0
        self.query_widths = []
        self._wrap(ppo_module)

    def _wrap(self, ppo_module):
        batch_generation, forward = ppo_module.batch_generation, ppo_module.forward

        def timed_batch_generation(model, queries, *args, **kwargs):
            start = time.perf_counter()
            query_responses, logits = batch_generation(model, queries, *args, **kwargs)
            self.generation_seconds += time.perf_counter() - start
            responses = query_responses[:, queries.shape[1] :]
            is_eos = responses == self.eos_id
            last = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), responses.shape[1] - 1)
            self.tokens += int((last + 1).sum())
            self.query_widths.append(queries.shape[1])
            return query_responses, logits

        def timed_forward(model, *args, **kwargs):
            if torch.is_grad_enabled() and self.update_start is None:
                self.update_start = time.perf_counter()
            return forward(model, *args, **kwargs)

        ppo_module.batch_generation = timed_batch_generation
        ppo_module.forward = timed_forward

    def _reset(self):
        self.start, self.update_start = time.perf_counter(), None
        self.generation_seconds, self.tokens, self.query_widths = 0.0, 0, []

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_step_end(self, args, state, control, **kwargs):
        end = time.perf_counter()
        update_start = self.update_start if self.update_start is not None else end
        self.seconds.append(end - self.start)
        self.generation.append(self.generation_seconds)
        self.rollout.append(update_start - self.start)
        self.update.append(end - update_start)
        self.generated_tokens.append(self.tokens)
        self.prompt_lengths.append(max(self.query_widths, default=0))
        print(f"PPO step {state.global_step}: {self.seconds[-1]:.2f} s (generation {self.generation_seconds:.2f} s,"
              f" rollout {self.rollout[-1]:.2f} s, update {self.update[-1]:.2f} s), {self.tokens} generated tokens,"
              f" padded prompt width {self.prompt_lengths[-1]}", file=sys.stderr, flush=True)  # fmt: skip
        self._reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("objective/kl", "objective/scores", "objective/entropy", "loss/policy_avg", "loss/value_avg", "val/num_eos_tokens")
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in (logs or {}).items() if k in keys}),
              file=sys.stderr, flush=True)  # fmt: skip


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="policy/reference causal LM folder (transformers 4.53 or 5 format)")
    parser.add_argument("--reward-model", required=True, help="reward model folder (LlamaForSequenceClassification, num_labels 1); also the value model's start")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps (TRL updates); the first is a warm-up and is not counted")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (micro-batch)")
    parser.add_argument("--grad-accum", type=int, default=4, help="gradient_accumulation_steps; prompts per rollout = batch-size x grad-accum")
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--max-prompt-length", type=int, default=128, help="prompts keep their last N tokens")
    parser.add_argument("--rows", type=int, default=200, help="first rows of the shipped prompts file to sample from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16: TRL's default (OnPolicyConfig bf16=True, autocast on CPU with use_cpu); fp32: matched against a 32-true run")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="trl-ppo-bench-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    from trl import PPOConfig, PPOTrainer
    from trl.trainer import ppo_trainer as ppo_module

    model_dir, model_patches = patched_copy(args.model, tmp / "policy")
    reward_dir, reward_patches = patched_copy(args.reward_model, tmp / "reward")
    prompts_per_rollout = args.batch_size * args.grad_accum
    if args.rows < prompts_per_rollout:
        raise SystemExit(f"trl_ppo.py: error: --rows {args.rows} < {prompts_per_rollout} prompts per rollout")

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")  # TRL's PPO example pads prompts on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise SystemExit(f"trl_ppo.py: error: the tokenizer of {args.model} has no chat template")
    dataset = prompt_dataset(tokenizer, args.rows, args.max_prompt_length)

    load = {"torch_dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    ref_policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, **load)

    config = PPOConfig(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_mini_batches=1,
        total_episodes=prompts_per_rollout * args.steps,
        response_length=args.response_length,
        num_ppo_epochs=args.ppo_epochs,
        temperature=0.7,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        learning_rate=1e-5,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        bf16=args.precision == "bf16",  # OnPolicyConfig's default is True
        fp16=False,
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(config.per_device_eval_batch_size)),  # built into a loader, never used
    )
    trainer.remove_callback(PrinterCallback)  # TRL logs every update; StepTimer prints a summary to stderr
    trainer.remove_callback(ProgressCallback)
    timer = StepTimer(ppo_module, tokenizer.eos_token_id)
    trainer.add_callback(timer)

    with contextlib.redirect_stdout(sys.stderr):  # TRL prints a banner; stdout keeps only the JSON line
        trainer.train()

    seconds = median_after_warmup(timer.seconds)
    generation = median_after_warmup(timer.generation)
    rates = [t / g for t, g in zip(timer.generated_tokens, timer.generation) if g > 0]
    result = {
        "library": "trl",
        "trainer": "PPOTrainer",
        "seconds_per_ppo_step": round(seconds, 3),
        "generation_seconds": round(generation, 3),
        "rollout_seconds": round(median_after_warmup(timer.rollout), 3),  # generation included
        "update_seconds": round(median_after_warmup(timer.update), 3),
        "generated_tokens_per_s": round(median_after_warmup(rates), 1) if rates else None,
        "step_seconds": [round(s, 3) for s in timer.seconds],
        "generated_tokens": timer.generated_tokens,
        "padded_prompt_widths": timer.prompt_lengths,
        "timed_steps": max(len(timer.seconds) - 1, 0),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "settings": {
            "model": str(Path(args.model).expanduser().resolve()),
            "reward_model": str(Path(args.reward_model).expanduser().resolve()),
            "steps": args.steps,
            "prompts_per_rollout": config.local_batch_size,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "num_mini_batches": config.num_mini_batches,
            "local_rollout_forward_batch_size": config.local_rollout_forward_batch_size,
            "optimizer_steps_per_ppo_step": config.num_ppo_epochs * config.num_mini_batches,
            "response_length": config.response_length,
            "max_prompt_length": args.max_prompt_length,
            "rows": args.rows,
            "num_ppo_epochs": config.num_ppo_epochs,
            "temperature": config.temperature,
            "kl_coef": config.kl_coef,
            "kl_estimator": config.kl_estimator,
            "learning_rate": config.learning_rate,
            "stop_token": config.stop_token,
            "missing_eos_penalty": config.missing_eos_penalty,
            "total_episodes": config.total_episodes,
            "precision": args.precision,
            "gradient_checkpointing": False,  # PPOTrainer.train() never turns it on
            "device": str(trainer.accelerator.device),
            "seed": args.seed,
        },
        "folder_patches": {"model": model_patches, "reward_model": reward_patches},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
