"""Exponential moving average of a model's weights, kept in fp32.

After update n (counting from 0) the shadow weights are

    shadow <- decay_n * shadow + (1 - decay_n) * param,   decay_n = min(decay, (1 + n) / (10 + n))

so early updates follow the model closely (decay 0.1, 0.18, 0.25, ...) and later ones approach
`decay`. Floating parameters are averaged; buffers and any other state-dict entries are copied.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel (`.module`) and
    torch.compile (`._orig_mod`) wrappers, however nested."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        # DDP and DataParallel hold the model as their only child, named "module"; a model that
        # merely has a sub-module called "module" among others is not a wrapper.
        if list(model._modules) == ["module"] and isinstance(model.module, nn.Module):
            model = model.module
            continue
        return model


class EMA:
    """fp32 shadow copies of a model's floating parameters, updated with foreach kernels.

    Create it after the model is on its device; the shadow lives on the same device. Wrapped
    models (DDP, torch.compile) are unwrapped, so keys never carry `module.` or `_orig_mod.`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        m = unwrap_model(model)
        params = list(m.parameters())  # unique tensors, in a fixed order
        self._num_params = len(params)
        self._index = [i for i, p in enumerate(params) if p.is_floating_point()]
        self._shadow = [params[i].detach().float().clone() for i in self._index]
        shadow_of = {id(params[i]): s for i, s in zip(self._index, self._shadow)}
        # state-dict keys -> shadow tensors; tied parameters share one shadow under each key
        self._state: dict[str, torch.Tensor] = {}
        self._copied: list[str] = []  # buffers (and non-floating parameters): copied as they are
        for key, value in m.state_dict(keep_vars=True).items():
            if id(value) in shadow_of:
                self._state[key] = shadow_of[id(value)]
            else:
                self._state[key] = value.detach().clone()
                self._copied.append(key)

    @property
    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards `model`'s current weights (call after each optimizer step)."""
        m = unwrap_model(model)
        params = list(m.parameters())
        if len(params) != self._num_params:
            raise ValueError(
                f"EMA.update: the model has {len(params)} parameters, the EMA tracks "
                f"{self._num_params}; pass the model the EMA was created from"
            )
        current = [params[i].detach() for i in self._index]
        current = [p if p.dtype == torch.float32 else p.float() for p in current]
        if current:
            torch._foreach_lerp_(self._shadow, current, 1.0 - self.current_decay)
        if self._copied:
            sd = m.state_dict(keep_vars=True)
            for key in self._copied:
                self._state[key].copy_(sd[key].detach())
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow tensors keyed like the model's state_dict (live references, like nn.Module's).

        Loads straight into a fresh model with `model.load_state_dict`; tied parameters appear
        under every key, sharing one tensor.
        """
        return dict(self._state)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], num_updates: int) -> None:
        """Copy saved shadow tensors in (keys and shapes must match) and set `num_updates`."""
        missing = sorted(self._state.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - self._state.keys())
        if missing or unexpected:
            raise KeyError(
                f"EMA state dict does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, target in self._state.items():
            source = state_dict[key]
            if source.shape != target.shape:
                raise ValueError(
                    f"EMA state dict: '{key}' has shape {tuple(source.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(source)
        self.num_updates = int(num_updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a separate copy used for sampling)."""
        unwrap_model(model).load_state_dict(self._state)
