"""Named DiT sizes; the keys are the CLI's `--model` choices. Adding a size is one line."""

from collections.abc import Callable
from functools import partial

from models.dit import DiT, DiTConfig

# name -> DiTConfig constructor still needing in_channels and num_classes.
MODELS: dict[str, Callable[..., DiTConfig]] = {
    "dit-t/2": partial(DiTConfig, hidden_size=64, depth=2, num_heads=2, patch_size=2),  # tests
    # the quickstart's (configs/default.json): on 2 CPU cores it reaches dit-s/2's quality in
    # less than half the time (bench/convergence.py, docs/figures.md)
    "dit-xs/2": partial(DiTConfig, hidden_size=256, depth=6, num_heads=4, patch_size=2),
    "dit-s/2": partial(DiTConfig, hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "dit-s/4": partial(DiTConfig, hidden_size=384, depth=12, num_heads=6, patch_size=4),
    "dit-b/2": partial(DiTConfig, hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "dit-b/4": partial(DiTConfig, hidden_size=768, depth=12, num_heads=12, patch_size=4),
    "dit-l/2": partial(DiTConfig, hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "dit-l/4": partial(DiTConfig, hidden_size=1024, depth=24, num_heads=16, patch_size=4),
    "dit-xl/2": partial(DiTConfig, hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def dit_config(name: str, in_channels: int = 4, num_classes: int = 0, **fields) -> DiTConfig:
    """The config of the named size for latents with `in_channels` and `num_classes` labels;
    `fields` set other `DiTConfig` fields (the text conditioning's)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **fields)


def build_dit(name: str, in_channels: int = 4, num_classes: int = 0, **fields) -> DiT:
    """A freshly initialised DiT of the named size (`dit_config`)."""
    return DiT(dit_config(name, in_channels, num_classes, **fields))
