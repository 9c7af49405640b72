"""scripts/gpu_vae_steps.py refuses bad input with one line, before starting any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import gpu_vae_steps

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = str(REPO_ROOT / "configs" / "vae_f8c16_gpu.json")


@pytest.mark.parametrize("flags, phrase", [
    (["--seconds", "0"], "--seconds 0.0: must be positive"),
    (["--seconds", "nan"], "--seconds nan: must be positive"),
    (["--fraction", "0"], "--fraction 0.0: must lie in (0, 1]"),
    (["--fraction", "1.5"], "--fraction 1.5: must lie in (0, 1]"),
    (["--config", "{tmp}/missing.json"], "{tmp}/missing.json: config file not found"),
    (["--dataset", "{tmp}/missing"], "{tmp}/missing: dataset folder not found"),
], ids=["seconds-zero", "seconds-nan", "fraction-zero", "fraction-above-one", "config-missing",
        "dataset-missing"])
def test_gpu_vae_steps_bad_input_is_one_line_error(tmp_path: Path, capsys, flags: list[str],
                                                   phrase: str) -> None:
    args = ["--config", CONFIG, "--dataset", str(tmp_path), "--seconds", "60"]
    assert gpu_vae_steps.main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {phrase.format(tmp=tmp_path)}"
