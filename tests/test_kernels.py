"""The decoding step's kernels (lit_rlhf/kernels.py) against transformers' bf16 modules and attention worked by hand."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lit_rlhf import kernels

BF16 = torch.bfloat16


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors of the same signs are, elementwise."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.fixture(autouse=True)
def built():
    assert kernels.library() is not None  # this machine's C++ compiler built them


def test_add_rms_norm_is_the_residual_add_then_transformers_rms_norm():
    torch.manual_seed(0)
    x, residual = torch.randn(16, 96).to(BF16) * 3, torch.randn(16, 96).to(BF16)
    norm = LlamaRMSNorm(96, eps=1e-5).to(BF16)
    norm.weight.data = torch.randn(96).to(BF16)
    summed = x + residual  # bf16
    out = kernels.add_rms_norm(x, residual, norm.weight, 1e-5)
    assert torch.equal(x, summed)  # in place
    expected = norm(summed)
    assert (out != expected).float().mean() < 1e-3 and ulps(out, expected).max() <= 1  # sums of squares added in another order
    assert torch.equal(kernels.add_rms_norm(summed.clone(), None, norm.weight, 1e-5), out)  # without a residual: the norm alone


def test_rotary_into_cache_is_transformers_rotary_embedding_written_at_the_last_position():
    torch.manual_seed(0)
    b, H, KV, D, capacity = 3, 4, 2, 8, 10
    qkv = torch.randn(b, (H + 2 * KV) * D).to(BF16)
    angles = torch.rand(b, 1, D // 2) * 6
    cos, sin = torch.cat([angles, angles], -1).cos().to(BF16), torch.cat([angles, angles], -1).sin().to(BF16)  # (b, 1, D)
    k_buffer, v_buffer = torch.zeros(2, b, KV, capacity, D, dtype=BF16)
    keys, values = k_buffer[:, :, :6], v_buffer[:, :, :6]  # 5 positions cached, the 6th new
    q = kernels.rotary_into_cache(qkv, cos.view(b, D), sin.view(b, D), keys, values, H)
    heads = qkv.view(b, H + 2 * KV, D)
    expected_q, expected_k = apply_rotary_pos_emb(heads[:, :H, None], heads[:, H : H + KV, None], cos, sin)  # (b, heads, 1, D)
    assert torch.equal(q, expected_q[:, :, 0])
    assert torch.equal(keys[:, :, 5], expected_k[:, :, 0]) and torch.equal(values[:, :, 5], heads[:, H + KV :])
    k_buffer[:, :, 5], v_buffer[:, :, 5] = 0, 0
    assert not k_buffer.any() and not v_buffer.any()  # nothing else written


def attention_inputs(b=4, H=6, KV=2, D=16, T=9, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, H, D).to(BF16)
    k_buffer, v_buffer = torch.randn(2, b, KV, T + 3, D).to(BF16)  # a preallocated cache, T positions written
    mask = torch.ones(b, T, dtype=torch.uint8)
    mask[1, :3], mask[2, :7] = 0, 0  # left padding
    return q, k_buffer[:, :, :T], v_buffer[:, :, :T], mask


def test_decode_attention_is_grouped_query_attention_over_the_unmasked_positions():
    q, keys, values, mask = attention_inputs()
    out = kernels.decode_attention(q, keys, values, mask)
    group = q.shape[1] // keys.shape[1]  # query heads 0-2 read KV head 0, 3-5 head 1
    scores = torch.einsum("bhd,bhtd->bht", q.float(), keys.float().repeat_interleave(group, 1)) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(mask[:, None] == 0, -torch.inf).softmax(-1)
    expected = torch.einsum("bht,bhtd->bhd", weights, values.float().repeat_interleave(group, 1))
    sdpa = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None].bool(), enable_gqa=True)[:, :, 0]
    assert (out.float() - expected).abs().max() <= max((sdpa.float() - expected).abs().max(), 2 ** -8 * expected.abs().max())


def test_decode_attention_with_equal_keys_is_the_mean_of_the_unmasked_values():
    q, keys, values, mask = attention_inputs()
    values = torch.arange(9.0).repeat_interleave(16).view(1, 1, 9, 16).expand_as(values).to(BF16).contiguous()  # position t: value t
    out = kernels.decode_attention(q, torch.zeros_like(values), values, mask)
    # every score equal: row 0 averages positions 0..8 (4), row 1 positions 3..8 (5.5), row 2 positions 7..8 (7.5)
    assert torch.equal(out[:3].float(), torch.tensor([4.0, 5.5, 7.5])[:, None, None].expand(3, 6, 16))


def test_decode_attention_reads_nothing_at_masked_positions():
    q, keys, values, mask = attention_inputs()
    out = kernels.decode_attention(q, keys, values, mask)
    keys[2, :, :7], values[2, :, :7] = float("nan"), float("inf")  # row 2's padding
    assert torch.equal(kernels.decode_attention(q, keys, values, mask), out)


def test_silu_mul_is_transformers_mlp_activation():
    torch.manual_seed(0)
    gate_up = (torch.randn(8, 2 * 64) * 4).to(BF16)
    gate, up = gate_up.chunk(2, -1)
    out, expected = kernels.silu_mul(gate_up), F.silu(gate) * up
    assert (out != expected).float().mean() < 1e-3 and ulps(out, expected).max() <= 1  # exp within 2 fp32 ulp, not libm's


def test_every_kernel_gives_the_same_bits_on_one_thread_as_on_two():
    q, keys, values, mask = attention_inputs(b=16)
    gate_up, x = torch.randn(16, 64).to(BF16), torch.randn(16, 32).to(BF16)
    run = lambda: (kernels.decode_attention(q, keys, values, mask), kernels.silu_mul(gate_up), kernels.add_rms_norm(x.clone(), x, x[0], 1e-6))  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_the_library_is_built_once_per_cpu_and_refused_builds_fall_back(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "FOLDER", tmp_path)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None and kernels.library() is kernels.library()
        assert len(list(tmp_path.glob("decode-*.so"))) == 1
        monkeypatch.setattr(kernels, "cpu_flags", lambda: "flags : another cpu")
        kernels.library.cache_clear()
        assert kernels.library() is not None and len(list(tmp_path.glob("decode-*.so"))) == 2  # built again for it
        monkeypatch.setattr(kernels, "cpu_flags", lambda: "flags : a third cpu")
        monkeypatch.setenv("CXX", "false")  # a compiler that fails
        kernels.library.cache_clear()
        with pytest.warns(UserWarning, match="did not compile"):
            assert kernels.library() is None
        assert len(list(tmp_path.iterdir())) == 2  # no partial file left
        monkeypatch.setenv("LIT_RLHF_KERNELS", "0")
        kernels.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.library() is None  # turned off: no build, no warning
    finally:
        kernels.library.cache_clear()
