"""The convergence benchmark on a tiny synthetic set: two recipes, two budgets, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import save_vae

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny_vae(folder: Path) -> Path:
    """A seeded VAE of the shipped one's latent shape (f8, 16 channels) at a fraction of its
    cost."""
    torch.manual_seed(0)
    config = VAEConfig(block_out_channels=(8, 8, 8, 16), latent_channels=16, layers_per_block=1,
                       norm_num_groups=4, mid_block_add_attention=False, use_quant_conv=False,
                       use_post_quant_conv=False, sample_size=64)
    save_vae(AutoencoderKL(config).eval(), folder)
    return folder


def test_convergence_reports_every_recipe_at_every_budget(tmp_path: Path) -> None:
    vae = _tiny_vae(tmp_path / "vae")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDM_CACHE_DIR": str(tmp_path / "cache")}
    tiny = {"dit.model": "dit-t/2", "dit.sample_steps": 2}
    cmd = [sys.executable, "bench/convergence.py", "--no-plain",
           "--recipe", "slow=" + json.dumps({**tiny, "train.lr": 3e-4}),
           "--recipe", "fast=" + json.dumps({**tiny, "train.lr": 1e-3}),
           "--budgets", "2", "1", "--samples-per-class", "2", "--dataset", "synthetic:40",
           "--holdout", "4", "--resolution", "64", "--vae", str(vae),
           "--work", str(tmp_path / "work"), "--plot", str(tmp_path / "plot.png")]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["budgets"] == [1.0, 2.0] and report["threads"] == 1
    assert report["peer"] == "slow" and report["chance"] == 0.25
    assert [(r["name"], r["lr"], r["model"]) for r in report["recipes"]] == [
        ("slow", 3e-4, "dit-t/2"), ("fast", 1e-3, "dit-t/2")]
    classes = {"discs", "stripes", "checkers", "clouds"}
    for name in ("slow", "fast"):
        rows = report["results"][name]
        assert [r["budget_s"] for r in rows] == [1.0, 2.0]
        assert 0 < rows[0]["step"] < rows[1]["step"]
        assert 0 < rows[0]["train_s"] < rows[1]["train_s"]
        for row in rows:
            assert row["samples_per_s"] > 0
            assert 0 <= row["accuracy"] <= 1
            assert set(row["per_class"]) == classes
            assert all(0 <= v <= 1 for v in row["per_class"].values())
            assert len(row["val_loss_bins"]) == 8 and row["val_loss"] > 0
            assert abs(row["val_loss"] - sum(row["val_loss_bins"]) / 8) < 1e-3
    assert all(r["accuracy_vs_peer"] == 0 for r in report["results"]["slow"])
    assert (tmp_path / "plot.png").stat().st_size > 0
    # each budget's checkpoint was deleted once evaluated; the run and its log remain
    run = Path(report["work"]) / "runs" / "fast"
    assert (run / "tb").is_dir() and not list((run / "checkpoints").glob("step_*"))
