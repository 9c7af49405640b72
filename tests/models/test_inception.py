"""models/inception.py: loads the pt_inception layout and computes what pytorch-fid and
torch-fidelity compute from the same file (a random-weight file: nothing is downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from models.inception import (WEIGHTS_NAME, InceptionFeatures, load_inception,
                              to_inception_input, weights_fingerprint)
from tests.models.inception_file import peer_hub, random_inception_file, varied_images


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception_file(tmp_path_factory)


@pytest.fixture(scope="module")
def extractor(weights: Path) -> InceptionFeatures:
    return InceptionFeatures(weights, "cpu", batch_size=2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two images (2, 3, 64, 80): not 299, so the resize runs."""
    return torch.from_numpy(varied_images(2, 64, 80, seed=1)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def features(extractor: InceptionFeatures, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """extractor(images): pool (2, 2048) and logits (2, 1008)."""
    return extractor(images)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_inception_features_equal_pytorch_fid_on_the_same_file(weights: Path, images: torch.Tensor,
                                                               features: tuple) -> None:
    from pytorch_fid.inception import InceptionV3

    with peer_hub(weights, WEIGHTS_NAME):  # pytorch-fid's own loader reads our file
        peer = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        expected = peer(images.float() / 255)[0].flatten(1)  # (2, 2048): its resize_input path
    pool, logits = features
    assert pool.dtype == logits.dtype == torch.float64
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert _rel(pool, expected) < 1e-5  # batch norms folded: float32 rounding only
    assert (pool[0] - pool[1]).abs().mean() > 1e-3  # the images give different features


def test_inception_network_equals_torch_fidelity_on_the_same_file(weights: Path,
                                                                  images: torch.Tensor) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x)

    peer = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(weights))
    image = images[:1]
    with torch.no_grad():
        pool_peer, logits_peer = peer(image)
        # torch-fidelity's own input path (TF1 resize, (x - 128) / 128) into our network
        x = interpolate_bilinear_2d_like_tensorflow1x(image.float(), size=(299, 299),
                                                      align_corners=False)
        pool, logits = load_inception(weights)((x - 128) / 128)
    assert _rel(pool, pool_peer) < 1e-6
    assert _rel(logits, logits_peer) < 1e-6  # IS logits: without the classifier bias


def test_inception_features_do_not_depend_on_layout_or_batching(extractor: InceptionFeatures,
                                                                images: torch.Tensor,
                                                                features: tuple) -> None:
    pool, logits = features
    singles = [img.permute(1, 2, 0).numpy()[None] for img in images]  # 2 x (1, 64, 80, 3)
    chunks = list(extractor.pool_features(singles))
    assert [len(c) for c in chunks] == [2]  # numpy channels-last items regrouped into a batch
    assert torch.equal(chunks[0], pool)
    # an item of 1 and an item of 3 in batches of 2: (item 1 + 1 of item 2), then 2
    chunks = list(extractor.pool_features([images[1:], torch.cat([images, images[1:]])]))
    assert [len(c) for c in chunks] == [2, 2]
    assert _rel(torch.cat(chunks), pool[[1, 0, 1, 1]]) < 1e-6
    assert torch.allclose(extractor.logits(pool), logits)


def test_inception_at_299_skips_the_resize() -> None:
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(to_inception_input(x), x.float() / 255 * 2 - 1)


def test_inception_loads_a_file_without_num_batches_tracked(weights: Path, tmp_path: Path) -> None:
    state = torch.load(weights, weights_only=True)
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, tmp_path / "trimmed.pth")
    net = load_inception(tmp_path / "trimmed.pth")
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var,
                       state["Mixed_7c.branch_pool.bn.running_var"])


def test_inception_refuses_missing_and_wrong_files(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        load_inception(tmp_path / "nowhere.pth")
    message = str(missing.value)
    assert WEIGHTS_NAME in message and "--inception" in message and "LDM_INCEPTION" in message
    assert "\n" not in message
    keys = list(torch.load(weights, weights_only=True, mmap=True))
    tiny = {k: torch.zeros(1) for k in keys}  # every key, none of the shapes: a small file
    torch.save({k: v for k, v in tiny.items() if not k.startswith("fc.")}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"a\.pth: not the FID Inception weights.*fc\.weight"):
        load_inception(tmp_path / "a.pth")
    torch.save(tiny, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"b\.pth: key Conv2d_1a_3x3\.conv\.weight should have "
                                         r"shape \(32, 3, 3, 3\), got \(1,\)"):
        load_inception(tmp_path / "b.pth")
    (tmp_path / "c.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"c\.pth: cannot be read"):
        load_inception(tmp_path / "c.pth")


def test_inception_fingerprint_is_the_sha256_of_the_file(weights: Path,
                                                         extractor: InceptionFeatures) -> None:
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights_fingerprint(weights) == expected == extractor.fingerprint


def test_inception_refuses_non_image_batches(extractor: InceptionFeatures) -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        extractor(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        extractor(torch.zeros(2, 4, 32, 32, dtype=torch.uint8))
