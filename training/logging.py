"""TensorBoard logging from rank 0; other ranks get a writer that does nothing.

A run logs into `RUN_DIR/tb/`; `tensorboard --logdir runs` shows every run under its folder's
name. The tags are grouped so that TensorBoard, which orders the groups by name, shows the loss
first and the learning rate soon after:

    loss/train, loss/val          the training loss (mean over the step's batch) and the
                                  validation loss (mean over the timestep bins); the VAE stage
                                  adds its terms (loss/rec, loss/kl, loss/perceptual, ...)
    loss_gan/...                  the VAE's adversarial term: adaptive weight, logits, ramp
    loss_train_by_bucket/WxH      the DiT's training loss per bucket shape
    loss_val_at_t/0.062 ...       the DiT's validation loss at timestep t (0: the clean latent,
                                  1: pure noise), each bin's midpoint; seeded, so runs compare
    optim/lr, optim/grad_norm     the learning rate and the gradient norm before clipping
    quality/fid, quality/kid      FID and KID of the DiT's EMA samples against training images
    quality/rfid                  FID of the VAE's held-out reconstructions against the originals
                                  (both with the FID Inception weights: `training/quality.py`)
    samples/WxH                   EMA sample grids (images)
    speed/samples_per_s, speed/data_wait_fraction
    val/psnr, val/ssim, val/reconstructions   the VAE's held-out reconstructions
"""

from __future__ import annotations

from pathlib import Path

import torch

# Tags that runs logged before the groups above, and their names now (`scripts/` read both).
RENAMED_TAGS = {"train/loss": "loss/train", "val/loss": "loss/val", "train/lr": "optim/lr",
                "train/grad_norm": "optim/grad_norm", "train/samples_per_s": "speed/samples_per_s",
                "train/data_wait_fraction": "speed/data_wait_fraction",
                "loss/total": "loss/train", "eval/psnr": "val/psnr", "eval/ssim": "val/ssim",
                **{f"gan/{k}": f"loss_gan/{k}" for k in ("adaptive_weight", "logits_real",
                                                         "logits_fake", "ramp")}}


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

    def text(self, name: str, text: str, step: int) -> None:
        """Log a text (markdown) at `step`: TensorBoard's Text tab."""
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
