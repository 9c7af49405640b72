"""Text-to-image runs end to end (`training/conditions.py`): captions from sidecars and
metadata.jsonl, the built-in encoder, frozen encoders' cached embeddings, exact resume,
torchrun, inference with prompts, and the one-line errors. Tiny models, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import Config, from_dict
from training.dit_stage import train_dit
from tests.training.test_dit_stage import _config, _scalars, _train, tiny_vae  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _text_config(tmp_path: Path, vae: Path, name: str = "run", dataset: str = "synthetic:24",
                 text: dict | None = None, **train) -> Path:
    path = _config(tmp_path / f"{name}.json", tmp_path / name, vae, **train)
    data = json.loads(path.read_text())
    data["data"].update(use_classes=False, captions=True, dataset=dataset)
    data["dit"]["cache_dir"] = str(tmp_path / "cache" / "latents")
    data["text"] = {"max_length": 48, "depth": 1, **(text or {})}
    path.write_text(json.dumps(data))
    return path


def _weights(run: Path, step: int, group: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{group}.safetensors")


def test_conditions_text_quickstart_end_to_end(tmp_path: Path, tiny_vae: Path) -> None:
    """The README's text quickstart in small: synthetic captions, the built-in encoder, prompt
    grids, then sampling from a prompt (PNG metadata) and from the export."""
    cfg = _text_config(tmp_path, tiny_vae, max_steps=2, eval_every=2, sample_every=2)
    out = _train("--config", str(cfg))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "captions: 20 images, 20 captioned" in out.stdout
    assert "captions (builtin text encoder)" in out.stdout
    run = tmp_path / "run"
    prompts = (run / "samples" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 2 and all(" " in p for p in prompts)  # validation captions
    assert _scalars(run, "loss/val") and _scalars(run, "loss/train")
    state = load_checkpoint(latest_checkpoint(run)).state
    assert state["text"] == {"kind": "builtin", "max_length": 48}
    assert any(k.startswith("text.") for k in _weights(run, 2, "ema"))  # the encoder is EMA'd

    sample = subprocess.run(
        [sys.executable, "inference.py", "--checkpoint", str(run), "--prompt",
         "two red discs on a white background", "--negative-prompt", "stripes",
         "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "out"), "--json",
         "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]
    summary = json.loads(sample.stdout)
    assert summary["prompts"] == ["two red discs on a white background"] * 2
    chunks = Image.open(summary["files"][0]).text
    assert chunks["prompt"] == "two red discs on a white background"
    assert chunks["negative_prompt"] == "stripes"
    for flags, words in ((["--class-label", "1"], "give --prompt, not --class-label"),
                         ([], "give --prompt or --prompts-file")):
        bad = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(run),
                              "--out", str(tmp_path / "bad"), *flags], cwd=REPO_ROOT,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert words in bad.stderr and not (tmp_path / "bad").exists()


def test_conditions_text_resume_is_exact(tmp_path: Path, tiny_vae: Path) -> None:
    """Two steps, then a resume to four, train as four straight: the built-in encoder, its
    EMA, the optimizer and each sample's caption pick are restored."""
    straight = _text_config(tmp_path, tiny_vae, "a", max_steps=4)
    assert _train("--config", str(straight)).returncode == 0
    split = _text_config(tmp_path, tiny_vae, "b", max_steps=2, ckpt_every=2)
    assert _train("--config", str(split)).returncode == 0
    resumed = _train("--config", str(split), "--resume", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _scalars(tmp_path / "a", "loss/train") == _scalars(tmp_path / "b", "loss/train")
    for group in ("model", "ema"):
        a, b = _weights(tmp_path / "a", 4, group), _weights(tmp_path / "b", 4, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group


def test_conditions_captions_are_drawn_per_sample_by_seed(tmp_path: Path) -> None:
    """An image with several captions trains with each of them; the pick depends on the
    sample's augment seed alone."""
    from training.conditions import caption_seed

    picks = {caption_seed(s) % 3 for s in range(200)}
    assert picks == {0, 1, 2}
    assert caption_seed(12345) == caption_seed(12345)
