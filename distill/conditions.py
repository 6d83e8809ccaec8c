"""The condition a network takes, as one value: class labels, or text (prompt embeddings, pooled embeddings and
time ids for SDXL-style UNets). The estimator and the module only ever move a condition around (repeat it for K
draws, slice it into chunks, stack it with the null condition for classifier-free guidance, move it to a device),
so they never branch on the kind of teacher; only the network adapters read its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Condition:
    """A batch of B conditions; every field that is set has the batch as its first dimension.

    labels:   (B,) int64 class indices (the null class is `num_classes`)
    embeds:   (B, L, D) prompt embeddings, the UNet's `encoder_hidden_states`
    pooled:   (B, P) pooled text embeddings (SDXL's `text_embeds`)
    time_ids: (B, 6) SDXL's size and crop conditioning (original h, w, crop top, left, target h, w)
    """

    labels: Tensor | None = None
    embeds: Tensor | None = None
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {name: v.shape[0] for name, v in self._items()}
        if not sizes:
            raise ValueError("a Condition needs at least one field")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Condition fields disagree on the batch size: {sizes}")

    def _items(self) -> list[tuple[str, Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        """The same condition with `fn` applied to every field that is set."""
        return Condition(**{name: fn(v) for name, v in self._items()})

    def __len__(self) -> int:
        return self._items()[0][1].shape[0]

    def __getitem__(self, index) -> Condition:
        return self.map(lambda v: v[index])

    def repeat_interleave(self, K: int) -> Condition:
        """Each condition K times in a row: rows n*K .. n*K+K-1 belong to sample n (the estimator's draw layout)."""
        return self.map(lambda v: v.repeat_interleave(K, dim=0))

    def expand(self, B: int) -> Condition:
        """A batch-1 condition (such as the null condition) as B rows."""
        return self.map(lambda v: v.expand(B, *v.shape[1:]))

    def to(self, *args, **kwargs) -> Condition:
        """Move (and, for the floating fields, cast) like Tensor.to; class labels keep their integer dtype."""
        dtype = kwargs.pop("dtype", None)
        if args and isinstance(args[0], torch.dtype):
            dtype, args = args[0], args[1:]
        moved = self.map(lambda v: v.to(*args, **kwargs))
        if dtype is None:
            return moved
        return moved.map(lambda v: v.to(dtype) if v.is_floating_point() else v)

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """Stack conditions of the same kind along the batch (e.g. [cond, null] for one batched CFG call)."""
        names = [[name for name, _ in c._items()] for c in conditions]
        if any(n != names[0] for n in names):
            raise ValueError(f"cannot stack conditions of different kinds: {names}")
        return Condition(**{n: torch.cat([getattr(c, n) for c in conditions]) for n in names[0]})


def as_condition(cond: Condition | Tensor | None) -> Condition | None:
    """A bare label tensor is a class condition (what the class-conditional code paths pass)."""
    if cond is None or isinstance(cond, Condition):
        return cond
    return Condition(labels=cond)
