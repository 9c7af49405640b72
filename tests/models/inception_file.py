"""A random-weight file in the `pt_inception-2015-12-05` layout, built from pytorch-fid's own
modules (never downloaded), shared by the Inception, FID and evaluate tests.

The file is pytorch-fid's FID Inception (torchvision's Inception-v3 with 1008 classes, no aux
head, and pytorch-fid's patched Mixed blocks) with seeded random weights, saved with
`torch.save(state_dict)` like the real file. Convolutions get He-normal weights and the batch
norms random statistics and affines, so that every tensor of the file matters to the output and
the features neither vanish nor blow up through the network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.inception import WEIGHTS_NAME


def pytorch_fid_network() -> nn.Module:
    """pytorch-fid's FID Inception-v3 with untrained weights, built without its loader."""
    import torchvision
    from pytorch_fid import inception as pfi

    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net.eval()


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """Write a seeded random-weight FID Inception state dict to `path`; returns `path`."""
    gen = torch.Generator().manual_seed(seed)
    net = pytorch_fid_network()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, math.sqrt(2 / fan_in), generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
                module.weight.uniform_(0.8, 1.2, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0, 4 / math.sqrt(module.in_features), generator=gen)
                module.bias.normal_(0, 1, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


_SESSION_FILES: dict[Path, Path] = {}  # the session's base temp folder -> its file


def random_inception_file(factory: pytest.TempPathFactory) -> Path:
    """One random-weight file per test session (`factory` is the session's tmp_path_factory),
    however many test modules ask for it."""
    base = factory.getbasetemp()
    if base not in _SESSION_FILES:
        _SESSION_FILES[base] = write_random_inception(factory.mktemp("inception") / WEIGHTS_NAME)
    return _SESSION_FILES[base]


@contextlib.contextmanager
def peer_hub(weights: Path, name: str) -> Iterator[None]:
    """Let a peer's `load_state_dict_from_url(... /name)` find `weights` in torch hub's cache.

    torch hub looks for `<hub dir>/checkpoints/<name>` before it downloads; the hub dir points
    at a temporary folder holding the file, and any download attempt fails the test.
    """
    import torch.hub

    def no_download(url: str, *args, **kwargs) -> None:
        raise AssertionError(f"a peer tried to download {url}")

    hub = weights.parent / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = hub / "checkpoints" / name
    if not target.exists():
        target.symlink_to(weights)
    old_dir, old_download = torch.hub.get_dir(), torch.hub.download_url_to_file
    torch.hub.set_dir(str(hub))
    torch.hub.download_url_to_file = no_download
    try:
        yield
    finally:
        torch.hub.set_dir(old_dir)
        torch.hub.download_url_to_file = old_download


def varied_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """n distinct uint8 RGB images (n, height, width, 3): smooth random fields of random colour
    and contrast, so that their Inception features differ from one another."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        coarse = rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3))
        field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC), np.float64) / 255  # (H, W, 3) in [0, 1]
        field = field * rng.uniform(0.2, 1.0) + rng.uniform(0, 0.5) * rng.random(3)
        noise = rng.normal(0, rng.uniform(0, 0.1), field.shape)
        out[i] = np.clip((field + noise) * 255, 0, 255).astype(np.uint8)
    return out
