"""One decoding step of a Llama-architecture model in bf16, fused: for CPUs with bf16 matmul units.

`generation.decode` calls the transformers model once per new token; at batch 64 on two cores that call
spends about as long on its ~40 small operations per layer and on re-laying out each weight for the
matmul kernel as on the matmuls themselves. `FusedLlama` runs the same layers with the weights laid out
once for oneDNN (`torch.ops.mkldnn`, bit-identical to `F.linear` in bf16), the q/k/v and the gate/up
projections as one matmul each, and rotary embeddings on queries and keys in one pass. Every sum is
rounded where transformers rounds it, so its logits are transformers' bit for bit (tests/test_fused_decode.py).
The prompt's prefill stays transformers' forward; both write the same KV cache.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from lit_rlhf.models import unwrap
from lit_rlhf.ops import grouped_query_attention

PACKING_BATCH = 64  # the batch size oneDNN lays the packed weights out for; others work as well
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # else the step runs on `F.linear` (tests), and `fusable` is False


def fusable(model: nn.Module) -> bool:
    """Whether `generation.decode` steps with `FusedLlama`: a Llama-architecture config with no attention or MLP
    biases and default rotary embeddings, on a CPU whose oneDNN has bf16 kernels, with bf16 weights or under bf16
    autocast (a `bf16-mixed` run's rollouts: the step then computes in bf16 throughout, as a bf16 sampler such as
    vLLM does)."""
    inner = unwrap(model)
    config, weight = inner.config, next(inner.parameters())
    return (config.model_type == "llama" and not config.attention_bias and not config.mlp_bias and config.hidden_act == "silu"
            and (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default") == "default"
            and weight.device.type == "cpu" and ONEDNN_BF16
            and (weight.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)))  # fmt: skip


def packed(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) bf16 weight laid out once for oneDNN's matmul (`linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKING_BATCH) if ONEDNN_BF16 else weight.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (b, in) @ a `packed` weight (out, in) transposed -> (b, out), bit-identical to `F.linear`"""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "") if ONEDNN_BF16 else F.linear(x, weight)


class FusedLlama:
    """A Llama model's decoding step over prepacked weights. Built from the model as it is now (a LoRA
    adapter merged in): build it again after the weights change.

    Args:
        model: a `LlamaForCausalLM` (or a peft model around one) for which `fusable` holds.
        weights: its weights under their transformers names (`models.merged_weights`).
    """

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]):
        inner = unwrap(model)
        config = inner.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed, self.rotary = inner.model.embed_tokens, inner.model.rotary_emb
        self.norm = weights["model.norm.weight"]
        self.lm_head = packed(weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))
        self.layers = []
        for i in range(config.num_hidden_layers):
            w = {name.removeprefix(f"model.layers.{i}."): tensor for name, tensor in weights.items() if name.startswith(f"model.layers.{i}.")}
            self.layers.append({
                "input_norm": w["input_layernorm.weight"], "post_norm": w["post_attention_layernorm.weight"],
                "qkv": packed(torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"])),
                "o": packed(w["self_attn.o_proj.weight"]),
                "gate_up": packed(torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])),
                "down": packed(w["mlp.down_proj.weight"]),
            })  # fmt: skip

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm: normalised in fp32, scaled in the model's dtype. (b, d) -> (b, d)"""
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The next-token logits after `tokens` (b,) at `positions` (b, 1), the rows' KV caches in `cache` (appended to
        in place) and `attention_mask` (b, T) over cache + token. -> (b, V) in bf16"""
        b, H, KV, D = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        x = self.embed(tokens).to(torch.bfloat16)  # (b, d)
        cos, sin = self.rotary(x, positions)  # (b, 1, D) each, broadcast over heads
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]  # (b, 1, 1, T)
        for layer, weights in zip(cache.layers, self.layers):
            qkv = linear(self.rms_norm(x, weights["input_norm"]), weights["qkv"]).view(b, H + 2 * KV, D)
            qk = qkv[:, : H + KV]
            qk = qk * cos + torch.cat([-qk[..., D // 2 :], qk[..., : D // 2]], -1) * sin  # rotary, queries and keys at once
            keys, values = layer.update(qk[:, H:, None], qkv[:, H + KV :, None])  # (b, KV, T, D) each
            out = grouped_query_attention(qk[:, :H, None], keys, values, mask)  # (b, H, 1, D)
            x = x + linear(out.view(b, H * D), weights["o"])
            gate, up = linear(self.rms_norm(x, weights["post_norm"]), weights["gate_up"]).chunk(2, -1)
            x = x + linear(F.silu(gate) * up, weights["down"])
        return linear(self.rms_norm(x, self.norm), self.lm_head)
