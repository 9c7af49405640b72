"""Training checkpoints shared by the VAE and DiT stages: written atomically, resumed safely.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_XXXXXXX/` (step zero-padded to 7 digits):

- `<group>.safetensors`: one file per named tensor group (`model`, `ema`, `discriminator`, ...);
- `optim.pt`: optimizer state dicts, loadable with `torch.load(path, weights_only=True)`;
- `state.json`: plain JSON (step, epoch, schedule position, config, ...). No RNG state: every
  random draw of training is a function of (seed, step) or of (seed, sample), so a resumed run
  draws what the uninterrupted one would.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXX-<pid>/`, every file and the folder
are fsynced, `state.json` goes last, and the folder is renamed into place. A folder counts as a
complete checkpoint only if it is named `step_<digits>` and holds `state.json`, so a save killed
at any moment leaves the previous checkpoints untouched and visible. Old checkpoints are deleted
only after the new one is complete, and are first renamed to a `.tmp-` name so that a deletion
interrupted half-way never leaves a folder that looks complete but is not.

The newest checkpoint is always the one written last: a save below the newest step is refused.
Continuing from an older checkpoint of a run first moves the newer ones out of `checkpoints/`
(`set_aside_newer`), so pruning never deletes what they hold and `--resume` never picks them up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TORCH_STATE_FILE = "optim.pt"
TENSOR_SUFFIX = ".safetensors"
SET_ASIDE = "set_aside"  # where set_aside_newer moves checkpoints, inside the run folder

_STEP_RE = re.compile(r"^step_(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"  # .tmp-step_XXXXXXX-<pid> (being written), .tmp-del-step_... (being deleted)
_ASIDE_PREFIX = ".old-"  # .old-step_XXXXXXX-<pid>: a checkpoint moved aside to be overwritten

# What torch.load(weights_only=True) accepts, by exact type (subclasses such as numpy.float64
# or collections.defaultdict pickle through globals it refuses).
_PLAIN_SCALARS = (str, int, float, bool, complex, bytes, bytearray, type(None))
_PLAIN_TORCH = (torch.Size, torch.dtype, torch.device)
_PLAIN_MAPPINGS = (dict, OrderedDict, Counter)
_PLAIN_SEQUENCES = (list, tuple, set)


@dataclass
class Checkpoint:
    """One loaded checkpoint: tensor groups, torch-saved state dicts and the JSON state."""

    path: Path  # the step_XXXXXXX folder
    tensors: dict[str, dict[str, torch.Tensor]]  # group name -> tensor name -> tensor
    torch_state: dict[str, Any]  # e.g. {"optimizer": ...}
    state: dict[str, Any]  # the JSON state, always holding "step"

    @property
    def step(self) -> int:
        """The training step this checkpoint was taken at."""
        return int(self.state["step"])

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of `<name>.safetensors`; FileNotFoundError naming the file if missing."""
        if name not in self.tensors:
            raise FileNotFoundError(f"{self.path / (name + TENSOR_SUFFIX)}: missing from the "
                                    "checkpoint")
        return self.tensors[name]


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint for `step`: `step_0001234`."""
    return f"step_{step:07d}"


def _is_complete(folder: Path) -> bool:
    return _STEP_RE.match(folder.name) is not None and (folder / STATE_FILE).is_file()


def _step_of(folder: Path) -> int:
    return int(_STEP_RE.match(folder.name).group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `run_dir/checkpoints/`, sorted by step (oldest first).

    Temporary folders, folders moved aside and `step_` folders without `state.json` are ignored.
    """
    return _complete_in(Path(run_dir) / CHECKPOINTS)


def _complete_in(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _is_complete(p)]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` designates: a run folder, its `checkpoints/`, or a checkpoint.

    A run folder or `checkpoints/` folder resolves to its newest complete checkpoint. Raises
    FileNotFoundError naming the path when it does not exist, holds no complete checkpoint, or is
    a checkpoint folder whose save did not finish.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint, checkpoints folder or run folder")
    if not p.is_dir():
        raise FileNotFoundError(
            f"{p}: expected a run folder, its checkpoints/ folder or a step_XXXXXXX folder"
        )
    if (p / STATE_FILE).is_file():
        if _is_complete(p):
            return p
        raise FileNotFoundError(
            f"{p}: not a checkpoint folder (expected a name like step_0001234 holding "
            f"{STATE_FILE}); temporary folders are unfinished saves"
        )
    if _STEP_RE.match(p.name):
        raise FileNotFoundError(
            f"{p}: incomplete checkpoint (no {STATE_FILE}; its save was interrupted); resume "
            f"from the run folder {p.parent.parent} to take the newest complete one"
        )
    ckpt_dir = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    found = _complete_in(ckpt_dir)
    if not found:
        raise FileNotFoundError(
            f"{p}: no complete checkpoint (expected {ckpt_dir}/step_XXXXXXX/{STATE_FILE})"
        )
    return found[-1]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (any path `resolve_resume` accepts) with tensors placed on `device`.

    Tensors come from safetensors and `optim.pt` is read with `torch.load(weights_only=True)`, so
    loading never runs code from the files.
    """
    folder = resolve_resume(path)
    device = str(torch.device(device))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob(f"*{TENSOR_SUFFIX}")):
        try:
            tensors[file.name[: -len(TENSOR_SUFFIX)]] = safetensors.torch.load_file(file, device)
        except Exception as exc:
            raise ValueError(f"{file}: cannot read safetensors file ({exc})") from exc
    torch_file = folder / TORCH_STATE_FILE
    if not torch_file.is_file():
        raise FileNotFoundError(f"{torch_file}: missing from the checkpoint")
    try:
        torch_state = torch.load(torch_file, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{torch_file}: cannot read with weights_only=True ({exc})") from exc
    return Checkpoint(path=folder, tensors=tensors, torch_state=torch_state,
                      state=read_state(folder))


def read_state(folder: Path) -> dict[str, Any]:
    """The JSON state of the checkpoint `folder`; ValueError naming the file if it is unreadable."""
    state_file = folder / STATE_FILE
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{state_file}: not valid JSON ({exc})") from exc


def set_aside_newer(checkpoint: Path) -> list[Path]:
    """Move the complete checkpoints newer than `checkpoint` out of its `checkpoints/` folder,
    so that a run continued from it stays the newest there; returns their new paths.

    They go, unchanged, to `RUN_DIR/set_aside/<time>_after_step_XXXXXXX/checkpoints/`: a folder
    laid out like a run, which `--resume`, `--export` and inference accept.
    """
    newer = [p for p in _complete_in(checkpoint.parent) if _step_of(p) > _step_of(checkpoint)]
    if not newer:
        return []
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_after_{checkpoint.name}"
    dest, n = checkpoint.parent.parent / SET_ASIDE / name, 1
    while dest.exists():  # a second roll-back to the same step within the second
        dest, n = dest.with_name(f"{name}_{n}"), n + 1
    (dest / CHECKPOINTS).mkdir(parents=True)
    for folder in newer:
        os.rename(folder, dest / CHECKPOINTS / folder.name)
    fsync_dir(checkpoint.parent)
    fsync_dir(dest / CHECKPOINTS)
    return [dest / CHECKPOINTS / folder.name for folder in newer]


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    torch_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write `run_dir/checkpoints/step_XXXXXXX/` atomically and return its path.

    tensors: group name -> state dict; each group becomes `<group>.safetensors`.
    torch_state: optimizer state dicts (any name), saved to `optim.pt`; only types that
        `torch.load(weights_only=True)` accepts are allowed.
    state: plain JSON; `step` is added (and must agree if present).
    keep_last: after the new checkpoint is complete, delete older complete ones so that the
        `keep_last` newest by step remain; <= 0 keeps all.

    Everything is checked before anything is written: a step below the newest checkpoint's, a
    non-finite floating tensor, a bad group name, a non-JSON state or a torch_state that would not
    load raise ValueError / TypeError.
    An existing checkpoint of the same step is replaced only once the new one is complete.
    Temporary folders left by dead processes are removed at the end.
    """
    state_text = _checked(step, tensors, torch_state, state)
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    complete = _complete_in(ckpt_dir)
    if complete and _step_of(complete[-1]) > step:
        raise ValueError(f"{ckpt_dir}: refusing to save step {step} below the newest checkpoint "
                         f"{complete[-1].name}; set the newer ones aside first (set_aside_newer)")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    aside = ckpt_dir / f"{_ASIDE_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for group, named in tensors.items():
            file = tmp / f"{group}{TENSOR_SUFFIX}"
            safetensors.torch.save_file(_cpu_copies(named), file, metadata={"format": "pt"})
            share_like_other_files(file)
            _fsync_file(file)
        with open(tmp / TORCH_STATE_FILE, "wb") as f:
            torch.save(torch_state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / STATE_FILE, "w") as f:  # last: its presence marks the folder complete
            f.write(state_text + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a directory cannot be renamed over a non-empty one
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside.exists():
        _delete(aside)
    if keep_last > 0:
        for old in _complete_in(ckpt_dir)[:-keep_last]:
            _delete(old)
    _remove_stale(ckpt_dir)
    return final


def _checked(step: int, tensors: dict[str, dict[str, torch.Tensor]], torch_state: dict[str, Any],
             state: dict[str, Any]) -> str:
    """The JSON text of `state` with `step`, once everything `save_checkpoint` refuses is
    ruled out (ValueError / TypeError naming what is wrong)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    for group in tensors:
        if not _GROUP_RE.match(group):
            raise ValueError(
                f"tensor group name {group!r} is not a plain file name (letters, digits, _.-)"
            )
    _check_finite(step, tensors)
    _check_weights_only(torch_state, "torch_state")
    if state.get("step", step) != step:
        raise ValueError(f"state['step'] = {state['step']!r} disagrees with step = {step}")
    try:
        return json.dumps({**state, "step": step}, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint state for step {step} is not plain JSON: {exc}") from exc


def _check_finite(step: int, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Raise ValueError naming the first group and tensor holding NaN or Inf."""
    for group, named in tensors.items():
        floats = [(k, t) for k, t in named.items() if t.is_floating_point() or t.is_complex()]
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for _, t in floats:  # one reduction per tensor, one sync per device
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
        if all(bool(torch.stack(f).all()) for f in flags.values()):
            continue
        bad = [k for k, t in floats if not bool(torch.isfinite(t.detach()).all())]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"refusing to save checkpoint step {step}: tensor '{bad[0]}' in group '{group}' "
            f"holds NaN or Inf{more}; nothing was written, earlier checkpoints are intact"
        )


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise TypeError naming the entry of `obj` that torch.load(weights_only=True) would refuse."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS or kind in _PLAIN_TORCH or isinstance(obj, torch.Tensor):
        return
    if kind in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            _check_weights_only(key, f"{where} key {key!r}")
            _check_weights_only(value, f"{where}[{key!r}]")
        return
    if kind in _PLAIN_SEQUENCES:
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "refuses; store plain numbers, strings, lists, dicts or tensors (e.g. a state_dict())"
    )


def _cpu_copies(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no two sharing storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in named.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # tied weights or views of one storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_like_other_files(path: Path) -> None:
    """Give a file safetensors wrote the permissions the umask gives any new file.

    safetensors creates its files readable by their owner alone (0600), so on a shared disk
    nobody else could read the weights of a run or an export.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new and renamed files) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(folder: Path) -> None:
    """Rename `folder` to a `.tmp-del-` name (no longer complete), then remove it."""
    doomed = folder.parent / f"{_TMP_PREFIX}del-{folder.name}-{os.getpid()}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_pid(folder: Path) -> int | None:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _remove_stale(ckpt_dir: Path) -> None:
    """Remove temporary folders of dead processes; put back a checkpoint moved aside by one."""
    for folder in ckpt_dir.iterdir():
        pid = _owner_pid(folder)
        if pid is None or _pid_alive(pid):
            continue
        if folder.name.startswith(_TMP_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(_ASIDE_PREFIX):
            # killed between moving the old checkpoint aside and renaming the new one in
            target = ckpt_dir / folder.name[len(_ASIDE_PREFIX) :].rsplit("-", 1)[0]
            if target.exists():
                _delete(folder)
            else:
                os.rename(folder, target)

