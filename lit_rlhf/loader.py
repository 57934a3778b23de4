"""Training batches that a checkpoint can resume mid-epoch, row for row, sharded over processes.

The sampler's state (shuffling seed, epoch, batches the training loop has taken) travels in the
checkpoint through the DataModule's `state_dict` / `load_state_dict`, so a killed and resumed run
sees exactly the rows an uninterrupted run sees. (Lightning's own loader-state path restores too
late when `configure_optimizers` reads `trainer.estimated_stepping_batches`, which builds the
training iterator before the checkpoint is loaded; the DataModule is restored before that.)

In a multi-process run (DDP, FSDP, DeepSpeed) every process builds the same permutation and takes
its own share of it: Lightning cannot put its `DistributedSampler` inside a custom batch sampler,
so the CLI turns that off (`use_distributed_sampler: false`) and this sampler shards by itself.
"""

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of row positions for process `rank` of `world_size` (W); batch size B per process.

    With `shuffle` (training), epoch `e` serves `randperm(num_rows)` under seed `seed + e`: the seed
    is the DataModule's `seed`, never torch's global RNG, so every process draws the same
    permutation. The permutation is cut to a multiple of W (at most W - 1 rows left out per epoch)
    so that every process gets the same number of rows and batches: a process that runs one step
    more than the others would wait for them forever. Process r takes positions r, r + W, r + 2W,
    ..., so the union of the processes' i-th batches is positions i*W*B to (i+1)*W*B - 1: the i-th
    batch of one process with batch size W*B.

    With `lengths` (each row's padded length in tokens) training batches are grouped by length, as
    transformers' `LengthGroupedSampler` does: the permutation is cut into mega-batches of 50 global
    batches, each sorted by length (longest first) and cut into global batches (W*B rows), and the
    global batches are shuffled under the same seed. A batch then holds rows of similar length, so
    little of it is padding; which rows share a batch is still random, and resuming still works.

    Without `shuffle` (validation) the rows stay in order and process r takes rows r, r + W, ...:
    every row is served exactly once (nothing cut, nothing repeated), and batch counts may differ
    by one between processes.
    """

    MEGA_BATCH = 50  # global batches sorted together by length

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 lengths: Optional[list[int]] = None):  # fmt: skip
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.lengths = None if lengths is None else torch.tensor(lengths)  # (num_rows,)
        self.rank, self.world_size = rank, world_size
        self.epoch = -1  # the epoch being served
        self.batches_done = 0  # batches of that epoch the training loop has taken
        self.batches_trained = 0  # batches of that epoch the finished training steps took (runs.StopCheckpoint)
        self.resuming = False  # set by load_state_dict: the next iteration continues `epoch`

    def served_rows(self) -> int:
        """Rows served per epoch by all processes together: training cuts `num_rows` to a multiple of W."""
        return self.num_rows - self.num_rows % self.world_size if self.shuffle else self.num_rows

    def __len__(self) -> int:
        return -(-len(range(self.rank, self.served_rows(), self.world_size)) // self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.batches_done = state["seed"], state["epoch"], state["batches_done"]
        self.resuming = True

    def __iter__(self) -> Iterator[list[int]]:
        if not self.resuming or self.batches_done >= len(self):  # a checkpoint at an epoch's end resumes the next one
            self.epoch, self.batches_done = self.epoch + 1, 0
        self.resuming, self.batches_trained = False, self.batches_done
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator)[: self.served_rows()]
            if self.lengths is not None:
                order = self.grouped_by_length(order, generator)
        else:
            order = torch.arange(self.num_rows)
        share = order[self.rank :: self.world_size]  # (num_rows // W,) in training
        for batch in share.split(self.batch_size)[self.batches_done :]:
            yield batch.tolist()

    def grouped_by_length(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`order` (a multiple of W rows) with each global batch's rows of similar length; the global batches shuffled."""
        global_batch = self.batch_size * self.world_size
        sorted_mega = [mega[self.lengths[mega].argsort(descending=True, stable=True)] for mega in order.split(global_batch * self.MEGA_BATCH)]
        batches = torch.cat(sorted_mega).split(global_batch)
        return torch.cat([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])


class CountingDataLoader(DataLoader):
    """A DataLoader over a `ResumableBatchSampler` that counts the batches it hands out.

    `next_batch` takes the next batch of the epoch the training loop is iterating, from the same stream: a step
    that needs more rows than its batch (PPO's dynamic sampling) takes the batches the next steps would have
    taken, counted alike, so a checkpoint resumes after them; with `limit`, they count against the epoch's batches
    (`--trainer.limit_train_batches`), which then ends after fewer steps."""

    batch_sampler: ResumableBatchSampler
    limit: Optional[int] = None  # batches an epoch may take in all (the trainer's `num_training_batches`); None: all

    def __iter__(self):
        self.live = self.counted(super().__iter__())
        return self.live

    def counted(self, batches):
        for batch in batches:
            if self.limit is not None and self.batch_sampler.batches_done >= self.limit:
                return  # the epoch ends sooner: a step took batches that later steps would have taken (`next_batch`)
            self.batch_sampler.batches_done += 1  # counted when taken, not when a worker prefetches it
            yield batch

    def next_batch(self) -> Optional[dict]:
        """The next batch of the epoch being iterated; None when the epoch has no batch left."""
        return next(self.live, None)
