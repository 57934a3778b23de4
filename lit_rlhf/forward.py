"""A model on a batch: the two quantities every trainer and the evaluation read (and, from lit_rlhf/generation.py, the answers).

A batch is a dict of (B, T) tensors: `input_ids`, `attention_mask` (from lengths, so a real EOS
that equals the pad id is kept), and for log-probs `labels` (the scored tokens, IGNORE_INDEX
elsewhere). Either padding side works: position ids start at 0 on each row's first real token.
"""

from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from lit_rlhf.models import unwrap
from lit_rlhf.ops import label_logps, label_logps_and_entropies, last_token_index, position_ids


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's `input_ids`, `position_ids` and the attention mask the model needs: none for a right-padded batch
    (each row's padding after its tokens), where causal attention alone keeps every real token from the padding and
    no loss reads the padding's outputs; the real tokens' outputs are the same, the forward faster on a CPU
    (docs/speed.md). A left-padded batch (prompts before responses) keeps its mask."""
    mask = batch["attention_mask"]
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    return dict(input_ids=batch["input_ids"], attention_mask=None if right_padded else mask, position_ids=position_ids(mask))


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, torch.Tensor]:
    """The transformers model inside `model` (peft adapters still active) and its backbone's last hidden states (B, T, H)."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    inputs = model_inputs(batch)
    if not isinstance(model, FSDPModule):
        return inner, backbone(**inputs).last_hidden_state
    # FSDP2: only the whole model's forward gathers its root weights (embeddings, norm, head; kept whole until
    # the backward) and schedules their gradients' reduction. So the whole model runs, its LM head on one
    # position only, and the backbone's output is caught on the way.
    caught = []
    hook = backbone.register_forward_hook(lambda module, args, output: caught.append(output.last_hidden_state))
    try:
        model(**inputs, **({"logits_to_keep": 1} if inner.can_generate() else {}))
    finally:
        hook.remove()
    return inner, caught[0]


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each label token under a causal LM. -> (B, T - 1) fp32, entry t scoring token t + 1; 0 off the labels.

    The LM head runs on the label positions only, in chunks (`ops.label_logps`). A model whose logits
    are more than `head(hidden)` (Gemma's soft-capping, a logit scale) runs its own forward instead.
    """
    return label_outputs(model, batch, temperature, label_logps)


def token_logps_and_entropies(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` and, from the same chunks of logits, the entropy of the next-token distribution at each label
    position (`ops.label_logps_and_entropies`). -> (B, T - 1), (B, T - 1) fp32, 0 off the labels."""
    return label_outputs(model, batch, temperature, label_logps_and_entropies)


def label_outputs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float, of_labels: Callable):
    """`of_labels(hidden, labels, temperature, head=...)` (`ops.label_logps` or `ops.label_logps_and_entropies`) on the
    model's last hidden states and LM head; on the full (B, T, V) logits for a model whose logits are more than
    `head(hidden)`."""
    if any(getattr(unwrap(model).config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        return of_labels(logits, batch["labels"], temperature)
    inner, hidden = hidden_states(model, batch)
    return of_labels(hidden, batch["labels"], temperature, head=inner.get_output_embeddings())


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`log p(completion | prompt)`: the label tokens' log-probs summed per row. -> (B,)"""
    return token_logps(model, batch).sum(-1)


def token_values(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar head of a sequence classifier (reward or value model) at every position. -> (B, T), fp32

    We run the backbone and the head ourselves: transformers' own pooling finds the last token as
    the last id != pad, which skips the real end-of-turn token when pad == EOS.
    """
    inner, hidden = hidden_states(model, batch)  # (B, T, H)
    head = inner.score if hasattr(inner, "score") else inner.classifier
    return head(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reward-model score of each sequence, read at its last real token. -> (B,)"""
    values = token_values(model, batch)  # (B, T)
    return values.gather(-1, last_token_index(batch["attention_mask"])[:, None]).squeeze(-1)


# ---- the responses of an RL step: a batch of prompt + response rows, the responses starting at `context_length` P


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor], context_length: int, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens under `model`, at the sampling `temperature`. -> (B, R)"""
    return token_logps(model, batch, temperature)[:, context_length - 1 :]


def response_logps_and_entropies(model: nn.Module, batch: dict[str, torch.Tensor], context_length: int, temperature: float) -> torch.Tensor:
    """`response_logps` and the entropy of the distribution each response token was drawn from, from the same chunks
    of logits. -> (B, R, 2): log-prob, entropy"""
    logps, entropies = token_logps_and_entropies(model, batch, temperature)  # (B, T - 1) each
    return torch.stack([logps, entropies], -1)[:, context_length - 1 :]


def response_values(model: nn.Module, batch: dict[str, torch.Tensor], context_length: int) -> torch.Tensor:
    """A value model's V(s_t) for the state before each response token. -> (B, R)"""
    return token_values(model, batch)[:, context_length - 1 : -1]
