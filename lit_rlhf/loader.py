"""Training batches that a checkpoint can resume mid-epoch, row for row.

The sampler's state (shuffling seed, epoch, batches the training loop has taken) travels in the
checkpoint through the DataModule's `state_dict` / `load_state_dict`, so a killed and resumed run
sees exactly the rows an uninterrupted run sees. (Lightning's own loader-state path restores too
late when `configure_optimizers` reads `trainer.estimated_stepping_batches`, which builds the
training iterator before the checkpoint is loaded; the DataModule is restored before that.)
"""

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of row positions; epoch `e` is `randperm(num_rows)` under seed `seed + e`.

    The seed is drawn from torch's global RNG when the first epoch starts, as `RandomSampler`
    draws its own, so `seed_everything` fixes it and the first epoch's order is the one
    `DataLoader(shuffle=True)` gives. The loader counts the batches the training loop takes.
    """

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool = True):
        self.num_rows, self.batch_size, self.shuffle = num_rows, batch_size, shuffle
        self.seed: int | None = None
        self.epoch = -1  # the epoch being served
        self.batches_done = 0  # batches of that epoch the training loop has taken
        self.resuming = False  # set by load_state_dict: the next iteration continues `epoch`

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.batches_done = state["seed"], state["epoch"], state["batches_done"]
        self.resuming = True

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle and self.seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if not self.resuming:
            self.epoch, self.batches_done = self.epoch + 1, 0
        self.resuming = False
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_rows)
        for batch in order.split(self.batch_size)[self.batches_done :]:
            yield batch.tolist()


class CountingDataLoader(DataLoader):
    """A DataLoader over a `ResumableBatchSampler` that counts the batches it hands out."""

    batch_sampler: ResumableBatchSampler

    def __iter__(self):
        for batch in super().__iter__():
            self.batch_sampler.batches_done += 1  # counted when taken, not when a worker prefetches it
            yield batch
