"""The data stream of `distill fit`: DMD reads no real data (its expectation is over the generator's own samples),
so each training step gets only its index, and nothing is decoded or drawn that the step would throw away. The GAN
and regression terms, which do read real data, bring their own stream."""

from __future__ import annotations

import itertools
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


class _Steps(IterableDataset):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return (torch.tensor(i) for i in itertools.count())


class StepStream(L.LightningDataModule):
    """An endless stream of step indices, one per training step (batch_size=None: no collation)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(), batch_size=None, num_workers=0)
