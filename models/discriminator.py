"""PatchGAN discriminator and hinge losses for adversarial VAE training (the LDM recipe).

The discriminator is the pix2pix "N-layer" layout: `n_layers` stride-2 4x4 convolutions that
double the width (capped at 8 x `ndf`), one stride-1 4x4 convolution, and a stride-1 4x4
convolution to a single logit channel. Every conv has padding 1; all but the first and last are
followed by BatchNorm, and all but the last by LeakyReLU(0.2). With the defaults
(in_channels=3, ndf=64, n_layers=3) this is

    conv s2 3->64, LReLU; conv s2 64->128, BN, LReLU; conv s2 128->256, BN, LReLU;
    conv s1 256->512, BN, LReLU; conv s1 512->1

and an (B, 3, H, W) image gives a (B, 1, H/8 - 2, W/8 - 2) map of per-patch logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: images (B, C, H, W) -> real/fake logits (B, 1, h, w).

    Convs are initialised N(0, 0.02) with zero bias, BatchNorm weights N(1, 0.02) with zero bias.
    Convs followed by BatchNorm carry no bias of their own.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(
                f"PatchDiscriminator needs in_channels, ndf and n_layers >= 1, got "
                f"in_channels={in_channels}, ndf={ndf}, n_layers={n_layers}"
            )
        self.in_channels = in_channels
        self.n_layers = n_layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = ndf
        # n_layers - 1 more stride-2 blocks, then one stride-1 block; width doubles each time.
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(width, out, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the DCGAN-style initialisation: convs N(0, 0.02), BatchNorm N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def min_input_size(self) -> int:
        """Smallest height/width that still yields a 1x1 logit map: 3 * 2**n_layers."""
        # Each stride-2 conv maps s -> floor(s / 2); each of the two stride-1 convs s -> s - 1.
        return 3 * 2**self.n_layers

    def forward(self, x: Tensor) -> Tensor:
        """Per-patch logits (B, 1, h, w) for images x (B, in_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        smallest = self.min_input_size()
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"PatchDiscriminator with n_layers={self.n_layers} needs H, W >= {smallest}, "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.main(x)  # (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2), floored


def share_batch_statistics(disc: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """`disc` with its BatchNorms normalising over the global batch when ranks train together.

    Under torchrun each rank sees only its share of a batch, so plain BatchNorm would normalise
    (and keep running statistics of) that share alone, and the discriminator would depend on
    how the batch is split. SyncBatchNorm gathers the statistics over all ranks; it needs a GPU,
    so on CPUs (gloo) the per-rank statistics stay. Parameter and buffer names are unchanged, so
    checkpoints load either way.
    """
    if world_size > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    return disc


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_hinge_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: -mean(logits_fake), a scalar."""
    return -logits_fake.mean()
