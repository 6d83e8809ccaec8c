"""Endless batches drawn from a sampling function: the data stream of the exact Gaussian-mixture teacher,
whose real samples cost nothing. Data code: takes a callable, imports no model code."""

from __future__ import annotations

from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


class _Stream(IterableDataset):
    def __init__(self, sample: Callable[..., tuple[Tensor, Tensor]], batch_size: int, seed: int):
        self.sample, self.batch_size, self.seed = sample, batch_size, seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, rank, 77]).generate_state(1)[0]))
        while True:
            x, labels = self.sample(self.batch_size, generator=gen)
            yield x, labels


class MixtureDataModule(L.LightningDataModule):
    """`sample(n, generator=...) -> (x, labels)` called once per batch, with a per-rank seeded generator."""

    def __init__(self, sample: Callable[..., tuple[Tensor, Tensor]], batch_size: int, seed: int = 0):
        super().__init__()
        self.sample, self.batch_size, self.seed = sample, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.sample, self.batch_size, self.seed), batch_size=None, num_workers=0)
