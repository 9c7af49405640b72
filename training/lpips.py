"""LPIPS perceptual distance on VGG16 features, built only from weight files on local disk.

Two files are needed, and nothing is downloaded:

- `vgg_path`: a torchvision VGG16 state dict (e.g. `vgg16-397923af.pth`). Only its `features.*`
  keys are read; the classifier is ignored.
- `lin_path`: the per-layer linear weights in the `lpips` package's `vgg.pth` layout, keys
  `lin0.model.1.weight` ... `lin4.model.1.weight`, each (1, C, 1, 1) and non-negative.

For images x, y (B, 3, H, W) in [-1, 1] the distance is computed as: shift and scale both into the
ImageNet-normalised range VGG expects, take the activations after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, unit-normalise each along channels, square the difference, weight channels
with the 1x1 linear layer, average over space and sum over the five taps -> (B,).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's VGG16 ("D") feature stack: conv widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
# Indices in `features` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# Maps images in [-1, 1] to ImageNet mean/std normalisation (per RGB channel).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def _vgg16_features() -> nn.Sequential:
    """VGG16 `features` up to relu5_3, indexed exactly like torchvision (state-dict compatible)."""
    layers: list[nn.Module] = []
    width = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(width, int(item), kernel_size=3, padding=1), nn.ReLU()]
            width = int(item)
    return nn.Sequential(*layers)  # 30 modules, the last one is relu5_3 (index 29)


def _unit_normalize(feat: Tensor) -> Tensor:
    """feat / (||feat||_2 over channels + eps), (B, C, H, W) -> (B, C, H, W).

    `vector_norm` has a zero subgradient at a zero vector, so all-zero feature columns (dead
    ReLUs) give zero gradients instead of NaN.
    """
    norm = torch.linalg.vector_norm(feat, dim=1, keepdim=True)  # (B, 1, H, W)
    return feat / (norm + _EPS)


def _read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """Load a tensor dict from `path`, with errors that name the file and what was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with objects, not a torch file
        raise ValueError(f"{path}: cannot be read as a torch state dict ({what}): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict ({what}), got {type(state).__name__}")
    return state


def _check_keys(
    path: Path, what: str, state: dict[str, Tensor], expected: dict[str, Tensor]
) -> None:
    """Refuse `state` unless it holds every key of `expected` with the same shape."""
    missing = [k for k in expected if k not in state]
    if missing:
        some = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        found = ", ".join(list(state)[:4]) or "none"
        raise ValueError(
            f"{path}: not {what}; {len(missing)} of {len(expected)} expected keys are missing "
            f"({some}); the file has keys like: {found}"
        )
    for k, ref in expected.items():
        if not isinstance(state[k], Tensor) or state[k].shape != ref.shape:
            got = tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__
            raise ValueError(f"{path}: key {k} should be {tuple(ref.shape)} for {what}, got {got}")


class LPIPS(nn.Module):
    """LPIPS(VGG16) distance: forward(x, y) with x, y (B, 3, H, W) in [-1, 1] -> (B,).

    Always frozen and in eval mode, but differentiable with respect to its inputs. Build it with
    `LPIPS.from_files`; a bare `LPIPS()` holds untrained weights.
    """

    min_size = 16  # four 2x max-pools before relu5_3

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Load VGG16 features from a torchvision state dict and the lpips `vgg.pth` lin weights.

        Raises FileNotFoundError when a file is missing and ValueError, naming the file, when it
        is unreadable, lacks expected keys, has wrong shapes, or has negative lin weights.
        """
        vgg_path, lin_path = Path(vgg_path), Path(lin_path)
        with torch.device("meta"):  # shapes only: no memory, no random init
            layout = cls()
        vgg_keys = {f"features.{k}": v for k, v in layout.features.state_dict().items()}
        lin_keys = {f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(layout.lins)}

        # Check both files completely before building anything.
        vgg_what = "a torchvision VGG16 state dict (features.* keys)"
        vgg_state = _read_state_dict(vgg_path, "LPIPS VGG16 weights, " + vgg_what)
        _check_keys(vgg_path, vgg_what, vgg_state, vgg_keys)
        lin_what = "LPIPS linear-layer weights (lpips vgg.pth layout, lin0..lin4.model.1.weight)"
        lin_state = _read_state_dict(lin_path, lin_what)
        _check_keys(lin_path, lin_what, lin_state, lin_keys)
        for key in lin_keys:
            if (lin_state[key] < 0).any():
                raise ValueError(f"{lin_path}: {key} has negative weights; LPIPS lins are >= 0")

        model = cls()
        model.features.load_state_dict({k[len("features."):]: vgg_state[k] for k in vgg_keys})
        for key, lin in zip(lin_keys, model.lins, strict=True):
            lin.weight.copy_(lin_state[key])
        return model

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent module asks: LPIPS is a fixed metric."""
        return super().train(False)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """VGG16 activations at the five taps for images x (B, 3, H, W) in [-1, 1].

        Returns [(B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4), (B, 512, H/8, W/8),
        (B, 512, H/16, W/16)] (sizes floored).
        """
        h = (x - self.shift) / self.scale  # (B, 3, H, W), ImageNet-normalised
        taps: list[Tensor] = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAP_INDICES:
                taps.append(h)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance (B,) between images x and y, both (B, 3, H, W) in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) images of one shape, got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"LPIPS needs H, W >= {self.min_size}, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        taps = self.feature_maps(torch.cat([x, y]))  # one VGG pass over (2B, 3, H, W)
        dist = x.new_zeros(b)  # (B,)
        for feat, lin in zip(taps, self.lins, strict=True):
            fx, fy = _unit_normalize(feat[:b]), _unit_normalize(feat[b:])  # (B, C, h, w) each
            d = lin((fx - fy) ** 2)  # (B, 1, h, w)
            dist = dist + d.mean(dim=(1, 2, 3))  # (B,)
        return dist
