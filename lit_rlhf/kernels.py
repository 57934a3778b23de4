"""Kernels of our own for the bf16 decoding step (`fused_decode.FusedLlama`), in `csrc/decode.cpp`.

At batch 64 on two cores a decoding step's ~25 small PyTorch operators per layer (norms, rotary embeddings, cache
writes, residual adds, SiLU) cost as long as dispatching them, and SDPA reads each cached key and value once per
query head. Here each of those parts is one pass: `add_rms_norm`, `rotary_into_cache`, `decode_attention` (the query
heads of a KV head read its keys and values together), `silu_mul`. They are compiled at first use by the machine's
C++ compiler for its CPU (`-march=native`, OpenMP: torch's own thread pool) into `~/.cache/lit-rlhf/kernels`, one
file per source, flags and CPU; where that fails, or with `LIT_RLHF_KERNELS=0`, `library()` is None and the step
runs on PyTorch's operators. Measured: docs/speed.md, "Generation".
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path
from typing import Optional

import torch

from lit_rlhf.atomic import written_atomically

SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
FOLDER = Path.home() / ".cache" / "lit-rlhf" / "kernels"
POINTER, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # C arguments in order; each function ends with its thread count
    "add_rms_norm": [POINTER] * 4 + [INT, INT, FLOAT],
    "rotary_into_cache": [POINTER] * 6 + [INT] * 7,
    "decode_attention": [POINTER] * 5 + [INT] * 8 + [FLOAT],
    "silu_mul": [POINTER] * 2 + [INT, INT],
}


def cpu_flags() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        import platform

        return platform.processor() or platform.machine()


@cache
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built once per source, flags and CPU; None where they are turned off
    (`LIT_RLHF_KERNELS=0`) or no compiler builds them (warned once)."""
    if os.environ.get("LIT_RLHF_KERNELS", "1") == "0":
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + cpu_flags().encode()).hexdigest()[:16]
    path = FOLDER / f"decode-{key}.so"
    if not path.exists():
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        try:
            if compiler is None:
                raise OSError("no C++ compiler on PATH (set CXX)")
            with written_atomically(path) as partial:
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or error
            warnings.warn(f"lit_rlhf.kernels: {SOURCE.name} did not compile ({detail}); bf16 decoding runs on PyTorch's operators")
            return None
    lib = ctypes.CDLL(str(path))
    for name, arguments in SIGNATURES.items():
        getattr(lib, name).argtypes = arguments + [ctypes.c_int]
        getattr(lib, name).restype = None
    return lib


def pointer(tensor: torch.Tensor) -> int:
    """The address of a bf16 (or uint8) tensor's first element, for a C kernel that reads it row-major."""
    assert tensor.dtype in (torch.bfloat16, torch.uint8), tensor.dtype
    return tensor.data_ptr()


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (b, d) += residual (b, d) in place when given; -> transformers' LlamaRMSNorm of x with `weight` (d,), (b, d)."""
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    out = torch.empty_like(x)
    library().add_rms_norm(pointer(x), None if residual is None else pointer(residual), pointer(weight), pointer(out),
                           x.shape[0], x.shape[1], eps, torch.get_num_threads())  # fmt: skip
    return out


def rotary_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      heads: int) -> torch.Tensor:  # fmt: skip
    """The rotary embedding (cos, sin (b, D)) of the queries and keys in qkv (b, (H + 2 KV) D); keys and values written
    at the last position of the caches `keys`, `values` (b, KV, T, D), views whose last two dims are contiguous.
    -> the queries (b, H, D)"""
    b, KV, T, D = keys.shape
    assert keys.stride() == values.stride() and keys.stride()[2:] == (D, 1) and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    q = qkv.new_empty(b, heads, D)
    library().rotary_into_cache(pointer(qkv), pointer(cos), pointer(sin), pointer(q), pointer(keys), pointer(values),
                                b, heads, KV, D, keys.stride(0), keys.stride(1), T - 1, torch.get_num_threads())  # fmt: skip
    return q


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row, q (b, H, D), over the cached keys, values (b, KV, T, D) at
    the positions where mask (b, T) uint8 is nonzero; each KV head serves H / KV query heads (grouped-query attention).
    -> (b, H, D)"""
    b, H, D = q.shape
    KV, T = keys.shape[1], keys.shape[2]
    assert keys.stride() == values.stride() and keys.stride()[2:] == (D, 1) and q.is_contiguous() and mask.is_contiguous() and mask.shape == (b, T) and H % KV == 0
    out = torch.empty_like(q)
    library().decode_attention(pointer(q), pointer(keys), pointer(values), pointer(mask), pointer(out), b, H, KV, D, T,
                               keys.stride(0), keys.stride(1), mask.stride(0), D**-0.5, torch.get_num_threads())  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaMLP activation in bf16: gate_up (b, 2F) = [gate, up] -> silu(gate) * up, (b, F)"""
    assert gate_up.is_contiguous()
    b, F2 = gate_up.shape
    out = gate_up.new_empty(b, F2 // 2)
    library().silu_mul(pointer(gate_up), pointer(out), b, F2 // 2, torch.get_num_threads())
    return out
