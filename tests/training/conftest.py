"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import save_vae


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-weight VAE with 4 latent channels, small enough for CPU stage tests."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, sample_size=32, force_upcast=False,
                                  scaling_factor=1.0, shift_factor=0.0))
    return save_vae(vae, tmp_path_factory.mktemp("vae") / "vae")
