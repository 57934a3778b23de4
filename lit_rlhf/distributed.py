"""What a multi-process run needs from the strategy, apart from the algorithms: sums, sharding, no-sync."""

from contextlib import nullcontext
from typing import Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from torch import nn

from lit_rlhf.errors import UserError
from lit_rlhf.models import unwrap


def sum_over_processes(trainer, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of the run (an all-reduce); `tensor` itself without a trainer."""
    return trainer.strategy.reduce(tensor, reduce_op="sum") if trainer is not None else tensor


def sharded(trainer) -> bool:
    """True if the strategy shards the parameters over processes (FSDP, FSDP2, DeepSpeed ZeRO-3): every forward
    is then a collective, so a process that finished generating must keep stepping until all have."""
    strategy = trainer.strategy if trainer is not None else None
    zero3 = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or zero3


def fsdp2(trainer) -> bool:
    """True under Lightning's `ModelParallelStrategy`, where the module shards itself (`fully_shard_models`)."""
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def fully_shard_models(models: list[nn.Module], mesh) -> None:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over the processes of the 1-D device `mesh`: each
    transformer block of every model (the classes transformers lists in `_no_split_modules`) is one shard
    unit, gathered for its forward and backward and freed after; the rest of each model (embeddings, final
    norm, head) is the root unit. Every process then holds 1/N of each weight."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for model in models:
        if isinstance(model, FSDPModule):
            continue  # sharded already (configure_model runs again for validate after fit)
        blocks = set(unwrap(model)._no_split_modules or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)


def data_parallel_mesh(strategy: ModelParallelStrategy):
    """The strategy's data-parallel mesh dimension, which the models shard over; this project applies no
    tensor parallelism, so a tensor-parallel size above 1 is refused."""
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise UserError(
            f"ModelParallelStrategy: tensor_parallel_size {mesh['tensor_parallel'].size()}; lit-rlhf shards with FSDP2 only:"
            f" set tensor_parallel_size 1 and data_parallel_size to the number of processes ({strategy.world_size}),"
            " as configs/strategies/fsdp2.yaml does"
        )
    return mesh["data_parallel"]


def gathered_state_dict(model: nn.Module) -> Optional[dict]:
    """The whole (unsharded) weights of an FSDP2 `model`, on CPU, in process 0; None elsewhere. A
    collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch.distributed.get_rank() == 0 else None


def no_backward_sync(trainer, enabled: bool):
    """Skip the DDP gradient all-reduce in this block (gradient accumulation's micro-steps but the last)."""
    strategy = trainer.strategy
    return strategy.block_backward_sync() if enabled and isinstance(strategy, ParallelStrategy) else nullcontext()
