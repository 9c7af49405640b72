"""Shared fixtures: every test writes its caches under a temporary folder, never the repo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point LDM_CACHE_DIR (scan cache, synthetic data, latents) at one folder per session."""
    path = tmp_path_factory.mktemp("ldm-cache")
    old = os.environ.get("LDM_CACHE_DIR")
    os.environ["LDM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LDM_CACHE_DIR", None)
    else:
        os.environ["LDM_CACHE_DIR"] = old


@pytest.fixture
def cache_dir(_session_cache_dir: Path) -> Path:
    """The session's cache folder (LDM_CACHE_DIR)."""
    return _session_cache_dir


@pytest.fixture
def assert_shared_mode():
    """A check that files have the permissions the umask gives any new file (safetensors alone
    would leave weights readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)

    def check(*paths: Path) -> None:
        for path in paths:
            assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, (path, oct(umask))

    return check


@pytest.fixture
def error_line(capsys: pytest.CaptureFixture):
    """A reader of what a command line wrote to stderr: checks that it is one line starting
    "error: " (bad input is a one-line error) and returns it."""
    def read() -> str:
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    return read


def make_tiny_run(root: Path) -> Path:
    """A tiny VAE (f = 2) and a dit-t/2 trained for 2 steps on it, checkpoints at steps 1, 2."""
    import torch

    from models.vae import AutoencoderKL, VAEConfig
    from models.vae_weights import save_vae
    from training.config import Config, from_dict
    from training.dit_stage import train_dit

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, sample_size=32, force_upcast=False,
                                  scaling_factor=1.0, shift_factor=0.0))
    vae_dir = save_vae(vae, root / "vae")
    cfg = {"description": "tiny DiT for inference tests", "stage": "dit",
           "run_dir": str(root / "run"), "seed": 3, "batch_size": 2,
           "data": {"dataset": "synthetic:24", "resolution": 32, "num_workers": 0,
                    "use_classes": True},
           "train": {"max_steps": 2, "lr": 1e-3, "log_every": 1, "eval_every": 1000,
                     "ckpt_every": 1, "sample_every": 1000, "precision": "fp32",
                     "device": "cpu"},
           "dit": {"model": "dit-t/2", "vae": str(vae_dir), "sample_sizes": ["32x32"],
                   "sample_steps": 2, "num_samples": 1, "base_tokens": 64}}
    return train_dit(from_dict(Config, cfg))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, _session_cache_dir: Path) -> Path:
    """One tiny DiT run (`make_tiny_run`) shared by the inference and export tests; tests only
    read it."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def loaded(tiny_run: Path):
    """`load_generator(tiny_run)`: (model, vae, info) of its newest checkpoint's EMA weights."""
    from training.export import load_generator

    return load_generator(tiny_run)
