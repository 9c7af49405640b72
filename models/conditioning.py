"""What a DiT is conditioned on, as one value (`cond`) with its own "null".

A condition kind is a plain object that every part of the pipeline asks the same questions:
the data pipeline turns each sample's stored value into a batch (`batch`), the objective drops
the condition of some samples for classifier-free guidance (`drop`), guidance pairs each
sample with the null condition in one batched pass (`with_null`), sampling and the command line
build conditions from what a user asks for (`parse`), and exports record the kind (`to_json`).
The model embeds `cond` (`DiT.forward(x, t, cond)`), and `cond=None` means the null condition
for every sample. A new kind of condition (a caption) is a new class with these methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class ClassCondition:
    """Class labels: `cond` is a LongTensor (B,) of class indices in 0..num_classes − 1.

    The null condition is the extra index `num_classes` (the model's label table has one row
    more than there are classes). A model trained without classes has `num_classes = 0`: every
    sample then carries the null label, and nothing is dropped or guided.
    """

    kind = "class"  # `names` label the classes for people (sub-folder names); indices if unknown

    def __init__(self, num_classes: int, names: Sequence[str] | None = None) -> None:
        if names is not None and len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]

    @property
    def null_index(self) -> int:
        """The label of the null (unconditional) class."""
        return self.num_classes

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The null condition for `batch` samples: (batch,) long."""
        return torch.full((batch,), self.null_index, dtype=torch.long, device=device)

    def batch(self, values: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The condition of samples whose stored values (record labels) are `values`: (B,)."""
        return torch.as_tensor(np.asarray(values, dtype=np.int64))

    def drop(self, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`cond` (B,) with the samples where `mask` (B,) bool is set replaced by the null."""
        return torch.where(mask, torch.full_like(cond, self.null_index), cond)

    def with_null(self, cond: torch.Tensor) -> torch.Tensor:
        """The batch `cond` followed by as many null conditions: (2B,), for guidance."""
        return torch.cat([cond, torch.full_like(cond, self.null_index)])

    def check(self, cond: torch.Tensor) -> None:
        """Refuse (ValueError) labels outside the model's classes (the null included)."""
        if self.num_classes == 0:
            raise ValueError("class labels given to a model trained without classes")
        if cond.numel() and not 0 <= int(cond.min()) <= int(cond.max()) < self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got "
                             f"{sorted(set(cond.tolist()))}")

    def parse(self, spec: str | None, count: int) -> torch.Tensor | None:
        """One label per sample from a command line's class (a name or an index), or every
        class in turn when `spec` is None; None for a model without classes (which refuses a
        class). ValueError names the choices."""
        if not self.num_classes:
            if spec is not None:
                raise ValueError(f"this model is unconditional (trained without classes); drop "
                                 f"--class-label {spec}")
            return None
        if spec is None:
            return self.batch([i % self.num_classes for i in range(count)])
        if spec in self.names:  # a name wins over an index that reads the same
            return self.batch([self.names.index(spec)] * count)
        if spec.lstrip("-").isdigit() and 0 <= int(spec) < self.num_classes:
            return self.batch([int(spec)] * count)
        shown = ", ".join(f"{i}={n}" for i, n in enumerate(self.names[:20]))
        more = f", ... ({self.num_classes} in all)" if self.num_classes > 20 else ""
        raise ValueError(f"unknown class {spec!r}; give a name or an index: {shown}{more}")

    def describe(self, cond: torch.Tensor, i: int) -> dict[str, Any]:
        """What sample i was conditioned on, for its PNG's text chunks."""
        label = int(cond[i])
        return {"class": self.names[label], "class_index": label}

    def to_json(self) -> dict[str, Any]:
        """Plain data for checkpoints and exports."""
        return {"kind": self.kind, "class_names": self.names}
