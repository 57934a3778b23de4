"""The default training precision: bf16-mixed where this machine multiplies bf16 fast, fp32 elsewhere.

bf16 is not fast everywhere. On a CPU with AVX512-BF16 or AMX a bf16 matmul runs about 4x faster
than fp32; on a CPU without bf16 units it is emulated and runs many times slower. The choice is
made from the hardware's capability flags, not from a timing, so every process of a multi-process
run makes the same one. An explicit `--trainer.precision` always wins. Whatever the precision,
log-softmax, log-probs, losses and advantages are computed in fp32 (lit_rlhf/ops.py upcasts).
"""

from pathlib import Path
from typing import Literal, Optional

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo that mean bf16 matmul units


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo does not exist."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def auto_precision(flags: set[str] | None = None) -> tuple[str, str]:
    """(Lightning precision, the reason in words) for this machine."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"the GPU ({name}) has bf16 units"
        return "32-true", f"the GPU ({name}) has no bf16 units"
    found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return "bf16-mixed", f"the CPU has bf16 matmul units ({', '.join(found)})"
    return "32-true", f"the CPU has no bf16 matmul units (none of {', '.join(BF16_CPU_FLAGS)}), where bf16 is emulated and slow"


def generation_precision(choice: Optional[Literal["bf16", "fp32"]] = None) -> str:
    """`choice`, or by default `bf16` where training would default to bf16-mixed (`auto_precision`), else `fp32`:
    the weights greedy answers are generated with (a bf16 copy reads half the bytes per decoded token)."""
    return choice or ("bf16" if auto_precision()[0] == "bf16-mixed" else "fp32")
