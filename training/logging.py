"""TensorBoard logging from rank 0; other ranks get a writer that does nothing."""

from __future__ import annotations

from pathlib import Path

import torch


class RunLogger:
    """Scalars and images into `RUN_DIR/tb/`. Inactive (all calls no-ops) when `active` is False.

    A run resumed from the checkpoint of `resumed_step` may find events of later steps in `tb/`:
    the process before it went on past that checkpoint (and was killed, or is an older branch).
    Those are hidden (TensorBoard purges, at the restart this writer records, the events of
    `resumed_step + 1` on that were written before it), so every step shows one value.
    """

    def __init__(self, run_dir: str | Path, active: bool = True,
                 resumed_step: int | None = None) -> None:
        self.writer = None
        if active:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"),
                                        purge_step=None if resumed_step is None
                                        else resumed_step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log each `name: value` at `step`."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, float(value), step)

    def image(self, name: str, image: torch.Tensor, step: int) -> None:
        """Log one image given as (3, H, W) floats in [0, 1] or uint8."""
        if self.writer is not None:
            self.writer.add_image(name, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
