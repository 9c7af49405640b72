"""The FID variant of Inception-v3, built to load `pt_inception-2015-12-05-6726825d.pth` unchanged.

That file is the TensorFlow Inception graph of 2015-12-05 (the one the original FID, IS and the
ADM evaluator use) converted to PyTorch by pytorch-fid; torch-fidelity loads a file of the same
layout. Nothing is downloaded here: the user supplies the file.

The network is Inception-v3 with 1008 classes and no auxiliary head, in the variant the TF graph
computes: every 3x3 average pool inside a Mixed block leaves the zero padding out of its mean
(`count_include_pad=False`), and the pool branch of the last block (Mixed_7c) is a max-pool.
Convolutions have no bias and are followed by batch norm (eps 1e-3) and ReLU.

`InceptionFeatures` is the entry point for metrics: uint8 images of any size in, float64 pool
features (N, 2048) and logits (N, 1008) out. Images are resized the way pytorch-fid resizes them
(`resize_input`): scaled to [0, 1], bilinear to 299x299 with `align_corners=False` and no
antialiasing, then mapped to [-1, 1]. The logits leave out the classifier bias, as the Inception
Score of the ADM evaluator (after the improved-gan code it links to) and torch-fidelity does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
MISSING_WEIGHTS_HINT = (f"get {WEIGHTS_NAME} (the pytorch-fid GitHub release, {WEIGHTS_URL}) and "
                        "pass its path with --inception PATH or set LDM_INCEPTION=PATH in .env")
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008

# A convolution: (input channels, output channels, kernel, stride, padding).
ConvSpec = tuple[int, int, int | tuple[int, int], int, int | tuple[int, int]]
# A branch: conv names applied in turn; a tuple of names is applied side by side to the same
# input and concatenated (the split 1x3 / 3x1 ends of the E blocks).
Branch = tuple[str | tuple[str, str], ...]


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU; state-dict keys `conv.*`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(cout, eps=1e-3)

    def fold(self) -> None:
        """Fold the (eval-mode) batch norm into the conv's weight and a bias (the per-channel
        scale and the bias computed in float64)."""
        bn, conv = self.bn, self.conv
        if bn is None:
            return
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C_out,)
        bias = bn.bias.double() - bn.running_mean.double() * scale  # (C_out,)
        with torch.no_grad():
            conv.weight.mul_(scale.to(conv.weight.dtype)[:, None, None, None])
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        self.bn = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x if self.bn is None else self.bn(x), inplace=True)


class Mixed(nn.Module):
    """One Inception block: conv branches and a pool branch, concatenated along channels.

    `pool` is ("avg" | "max", stride); an average pool leaves padding out of its mean. The pool
    branch ends in the conv named `branch_pool` when there is one (blocks A, C and E).
    """

    def __init__(self, convs: dict[str, ConvSpec], branches: tuple[Branch, ...],
                 pool: tuple[str, int]) -> None:
        super().__init__()
        for name, spec in convs.items():
            self.add_module(name, ConvBN(*spec))
        self.branches = branches
        self.pool_kind, self.pool_stride = pool

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, tuple):  # (N, C, H, W) -> (N, 2C, H, W)
                    y = torch.cat([self.get_submodule(name)(y) for name in step], 1)
                else:
                    y = self.get_submodule(step)(y)
            outs.append(y)
        pad = 1 if self.pool_stride == 1 else 0  # stride 1 keeps the size, stride 2 halves it
        if self.pool_kind == "max":
            y = F.max_pool2d(x, 3, stride=self.pool_stride, padding=pad)
        else:
            y = F.avg_pool2d(x, 3, stride=self.pool_stride, padding=pad, count_include_pad=False)
        if hasattr(self, "branch_pool"):
            y = self.branch_pool(y)
        outs.append(y)
        return torch.cat(outs, 1)  # (N, sum of branch channels, H', W')


def _block_a(cin: int, pool_features: int) -> Mixed:
    return Mixed({"branch1x1": (cin, 64, 1, 1, 0),
                  "branch5x5_1": (cin, 48, 1, 1, 0), "branch5x5_2": (48, 64, 5, 1, 2),
                  "branch3x3dbl_1": (cin, 64, 1, 1, 0), "branch3x3dbl_2": (64, 96, 3, 1, 1),
                  "branch3x3dbl_3": (96, 96, 3, 1, 1),
                  "branch_pool": (cin, pool_features, 1, 1, 0)},
                 (("branch1x1",), ("branch5x5_1", "branch5x5_2"),
                  ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")), ("avg", 1))


def _block_b(cin: int) -> Mixed:
    return Mixed({"branch3x3": (cin, 384, 3, 2, 0),
                  "branch3x3dbl_1": (cin, 64, 1, 1, 0), "branch3x3dbl_2": (64, 96, 3, 1, 1),
                  "branch3x3dbl_3": (96, 96, 3, 2, 0)},
                 (("branch3x3",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")),
                 ("max", 2))


def _block_c(cin: int, c7: int) -> Mixed:
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
    return Mixed({"branch1x1": (cin, 192, 1, 1, 0),
                  "branch7x7_1": (cin, c7, 1, 1, 0),
                  "branch7x7_2": (c7, c7, row[0], 1, row[1]),
                  "branch7x7_3": (c7, 192, col[0], 1, col[1]),
                  "branch7x7dbl_1": (cin, c7, 1, 1, 0),
                  "branch7x7dbl_2": (c7, c7, col[0], 1, col[1]),
                  "branch7x7dbl_3": (c7, c7, row[0], 1, row[1]),
                  "branch7x7dbl_4": (c7, c7, col[0], 1, col[1]),
                  "branch7x7dbl_5": (c7, 192, row[0], 1, row[1]),
                  "branch_pool": (cin, 192, 1, 1, 0)},
                 (("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
                  tuple(f"branch7x7dbl_{i}" for i in range(1, 6))), ("avg", 1))


def _block_d(cin: int) -> Mixed:
    return Mixed({"branch3x3_1": (cin, 192, 1, 1, 0), "branch3x3_2": (192, 320, 3, 2, 0),
                  "branch7x7x3_1": (cin, 192, 1, 1, 0),
                  "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
                  "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
                  "branch7x7x3_4": (192, 192, 3, 2, 0)},
                 (("branch3x3_1", "branch3x3_2"),
                  tuple(f"branch7x7x3_{i}" for i in range(1, 5))), ("max", 2))


def _block_e(cin: int, pool_kind: str) -> Mixed:
    return Mixed({"branch1x1": (cin, 320, 1, 1, 0),
                  "branch3x3_1": (cin, 384, 1, 1, 0),
                  "branch3x3_2a": (384, 384, (1, 3), 1, (0, 1)),
                  "branch3x3_2b": (384, 384, (3, 1), 1, (1, 0)),
                  "branch3x3dbl_1": (cin, 448, 1, 1, 0), "branch3x3dbl_2": (448, 384, 3, 1, 1),
                  "branch3x3dbl_3a": (384, 384, (1, 3), 1, (0, 1)),
                  "branch3x3dbl_3b": (384, 384, (3, 1), 1, (1, 0)),
                  "branch_pool": (cin, 192, 1, 1, 0)},
                 (("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
                  ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b"))),
                 (pool_kind, 1))


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: forward((N, 3, H, W) in [-1, 1]) -> (pool (N, 2048), logits (N, 1008)).

    H and W are at least 75 (the metrics feed 299x299). The logits are `pool @ fc.weight.T`,
    without `fc.bias`: the Inception Score's convention. Module names and shapes are those of
    the weights file, so `load_state_dict` takes it unchanged (`num_batches_tracked` optional).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        self.Mixed_6a = _block_b(288)
        self.Mixed_6b = _block_c(768, 128)
        self.Mixed_6c = _block_c(768, 160)
        self.Mixed_6d = _block_c(768, 160)
        self.Mixed_6e = _block_c(768, 192)
        self.Mixed_7a = _block_d(768)
        self.Mixed_7b = _block_e(1280, "avg")
        self.Mixed_7c = _block_e(2048, "max")  # the TF graph's max-pool
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def fold_batchnorm(self) -> FIDInceptionV3:
        """Fold every batch norm into its conv (for inference: the same function to float32
        rounding, one pass less over each activation). The folded network no longer loads the
        weights file; returns self."""
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fold()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149) at 299
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # (N, 2048)
        return pool, pool @ self.fc.weight.T  # (N, 2048), (N, 1008)


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of the weights file's bytes: part of every cached statistics key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path: str | Path) -> FIDInceptionV3:
    """The network with the weights of `path` (a `pt_inception-2015-12-05` file), on the CPU,
    frozen and in eval mode.

    Raises FileNotFoundError (with what to get and where to put it) when there is no such file,
    and ValueError naming the file when it is not a state dict of this layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}; {MISSING_WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle of objects
        raise ValueError(f"{path}: cannot be read as a torch state dict ({e}); expected "
                         f"{WEIGHTS_NAME}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict ({WEIGHTS_NAME}), got "
                         f"{type(state).__name__}")
    with torch.device("meta"):  # shapes only: the file supplies every value
        net = FIDInceptionV3()
    layout = net.state_dict()
    expected = {k: v for k, v in layout.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    if missing:
        found = ", ".join(list(state)[:3]) or "none"
        raise ValueError(f"{path}: not the FID Inception weights ({WEIGHTS_NAME}): "
                         f"{len(missing)} of {len(expected)} keys are missing, e.g. {missing[0]}; "
                         f"the file has keys like {found}")
    for k, ref in expected.items():
        if not isinstance(state[k], Tensor) or state[k].shape != ref.shape:
            got = tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__
            raise ValueError(f"{path}: key {k} should have shape {tuple(ref.shape)}, got {got}")
    values = {k: state[k].float() for k in expected}
    values |= {k: torch.zeros((), dtype=torch.long) for k in layout if k not in expected}
    net.load_state_dict(values, assign=True)
    return net.requires_grad_(False).eval()


def to_inception_input(images: Tensor) -> Tensor:
    """uint8 images (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 1], pytorch-fid's resize.

    Scaled to [0, 1] first, then bilinear to 299x299 (`align_corners=False`, no antialiasing;
    skipped at 299, where it would be the identity), then `2x - 1`, on the images' device.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.float() / 255  # (N, 3, H, W) in [0, 1]
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x * 2 - 1  # (N, 3, 299, 299)


def as_nchw(images: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, 3, H, W) or (N, H, W, 3) (a tensor or array) -> a (N, 3, H, W) uint8 tensor.

    A batch whose dimension 1 has 3 entries is taken as channels-first.
    """
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        x = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        x = images
    if x.dtype != torch.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
        raise ValueError(f"expected uint8 images (N, 3, H, W) or (N, H, W, 3), got {x.dtype} "
                         f"{tuple(x.shape)}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)  # (N, 3, H, W)


class InceptionFeatures:
    """Pool features and logits of uint8 images under the FID Inception network.

        extract = InceptionFeatures("pt_inception-2015-12-05-6726825d.pth", "cuda")
        pool, logits = extract(images)  # uint8 (N, 3, H, W) or (N, H, W, 3), any H and W
        # pool (N, 2048) float64, logits (N, 1008) float64, both on the CPU

    The network runs in float32 with its batch norms folded into the convolutions, in the
    channels-last layout, with TF32 convolutions turned off (so a GPU gives the CPU's numbers to
    float32 rounding), in batches of `batch_size`; the logits are computed from the pool features
    in float64. `fingerprint` is the SHA-256 of the weights file.
    """

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = Path(weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        net = load_inception(self.weights).fold_batchnorm()
        self.net = net.to(self.device, memory_format=torch.channels_last)
        self.fc_weight = self.net.fc.weight.detach().to("cpu", torch.float64)  # (1008, 2048)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the weights file, computed once."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.weights)
        return self._fingerprint

    @torch.inference_mode()
    def _forward(self, batch: Tensor) -> Tensor:
        """(n, 3, 299, 299) float32 on the device -> pool (n, 2048) float64 on the CPU."""
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            pool, _ = self.net(batch.contiguous(memory_format=torch.channels_last))
        return pool.to("cpu", torch.float64)

    def pool_features(self, images: Iterable[Tensor | np.ndarray]) -> Iterator[Tensor]:
        """Pool features (n, 2048) float64 of a stream of uint8 image batches of any sizes.

        Each item of `images` is a batch as `as_nchw` takes it (one size within a batch); the
        items are resized one by one and regrouped into batches of `batch_size`, so a stream of
        single images runs as fast as one of full batches. Yields one array per network batch.
        """
        pending: list[Tensor] = []  # (k, 3, 299, 299) float32 pieces, fewer than a batch in all
        count = 0
        for item in images:
            x = as_nchw(item)
            for start in range(0, len(x), self.batch_size):
                piece = to_inception_input(x[start:start + self.batch_size].to(self.device))
                pending.append(piece)
                count += len(piece)
                while count >= self.batch_size:
                    batch = torch.cat(pending)  # (count, 3, 299, 299)
                    yield self._forward(batch[:self.batch_size])
                    rest = batch[self.batch_size:]
                    pending, count = ([rest] if len(rest) else []), len(rest)
        if count:
            yield self._forward(torch.cat(pending))

    def logits(self, pool: Tensor) -> Tensor:
        """Logits (N, 1008) float64 of pool features (N, 2048), without the classifier bias."""
        return pool.to(torch.float64) @ self.fc_weight.T.to(pool.device)

    def __call__(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """(pool (N, 2048), logits (N, 1008)), float64 on the CPU, of one uint8 batch."""
        chunks = list(self.pool_features([images]))
        pool = torch.cat(chunks) if chunks else torch.zeros(0, POOL_DIM, dtype=torch.float64)
        return pool, self.logits(pool)
