"""Tiny models and a byte-level ChatML tokenizer built in code: no test touches the network."""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# what the tests cache (tokenized rows, reference log-probs, datasets' own files) goes to a folder of this
# session, not to the user's cache; the subprocesses of the multi-process tests inherit it
DATASETS_CACHE = tempfile.mkdtemp(prefix="lit-rlhf-tests-")
os.environ["HF_DATASETS_CACHE"] = DATASETS_CACHE

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# the shape of SmolLM's template: ChatML, pad == eos == <|im_end|>
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# SmolLM2-135M-Instruct's template (from its tokenizer): ChatML with a default system turn
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI"
    " assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' +"
    " message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHIPPED_ROWS = Path(__file__).parents[1] / "lit_rlhf" / "assets" / "human_like_dpo_1k.jsonl"


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(DATASETS_CACHE, ignore_errors=True)


def fit_args(module: str, model_dir: str | Path, dataset: str | Path, *extra: str, max_length: int | None = 64,
             max_prompt_length: int = 32, model_summary: bool = False, sanity_val_steps: int | None = 0) -> list[str]:  # fmt: skip
    """The flags of `lit-rlhf fit` (without the word `fit`: what `cli(..., run=False)` takes) that train `module` (a class
    path) from `model_dir` on the rows of `dataset`: short rows, no progress bar, no model summary, no sanity check,
    then `extra`. `max_length=None` passes no length flags, `model_summary=True` keeps Lightning's summary, and
    `sanity_val_steps=None` passes none (Lightning's default, 2)."""
    lengths = [] if max_length is None else ["--data.max_length", str(max_length), "--data.max_prompt_length", str(max_prompt_length)]
    summary = [] if model_summary else ["--trainer.enable_model_summary", "false"]
    sanity = [] if sanity_val_steps is None else ["--trainer.num_sanity_val_steps", str(sanity_val_steps)]
    return [
        "--model", module, "--model.model_name_or_path", str(model_dir), "--data.dataset", str(dataset), *lengths,
        "--trainer.enable_progress_bar", "false", *summary, *sanity, *extra,
    ]  # fmt: skip


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte plus the three ChatML specials (ids 256, 257, 258)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def make_causal_lm(tokenizer, seed: int = 0, num_attention_heads: int = 4, num_key_value_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny random-init causal LM with the ChatML tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def real_rows() -> Path:
    """Real preference rows shipped in the package: the same data on every machine."""
    return SHIPPED_ROWS


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> str:
    """A tiny reward model: the tiny LM with a random scalar head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-reward")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def first_prompt_batch(model_dir: str, rows: Path, batch_size: int) -> dict:
    """The first training batch of left-padded prompts (`--data.mode prompts`) from 12 of `rows`, tokenized for `model_dir`."""
    from lit_rlhf.data import PreferenceDataModule

    dm = PreferenceDataModule(dataset=str(rows), tokenizer_name_or_path=model_dir, mode="prompts", limit=12, val_size=4,
                              batch_size=batch_size, max_length=64, max_prompt_length=32)  # fmt: skip
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))
