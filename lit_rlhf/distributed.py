"""What a multi-process run needs from the strategy, apart from the algorithms: sums, sharding, no-sync."""

from contextlib import nullcontext

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ParallelStrategy


def sum_over_processes(trainer, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of the run (an all-reduce); `tensor` itself without a trainer."""
    return trainer.strategy.reduce(tensor, reduce_op="sum") if trainer is not None else tensor


def sharded(trainer) -> bool:
    """True if the strategy shards the parameters over processes (FSDP, DeepSpeed ZeRO-3): every forward is
    then a collective, so a process that finished generating must keep stepping until all have."""
    strategy = trainer.strategy if trainer is not None else None
    return isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3)


def no_backward_sync(trainer, enabled: bool):
    """Skip the DDP gradient all-reduce in this block (gradient accumulation's micro-steps but the last)."""
    strategy = trainer.strategy
    return strategy.block_backward_sync() if enabled and isinstance(strategy, ParallelStrategy) else nullcontext()
