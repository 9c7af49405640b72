"""Digests of the weights two fixed-seed tiny runs end with: one DiT stage, one VAE stage.

A refactor that must not change training (the restructure of issue 18, say) is checked by
running this before and after it: equal digests mean bitwise-identical model, EMA and optimizer
state. The runs are tiny (a dit-t/2 on 32-px synthetic latents, a 2-level VAE at 32 px, a few
dozen steps on one CPU thread), so the check takes about a minute.

    UV_CACHE_DIR=.uv-cache uv run python scripts/weights_digest.py [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def digest(folder: Path) -> str:
    """sha256 over every file of a checkpoint folder (tensors, optimizer state, JSON state
    without its run-specific paths), in name order."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.name == "state.json":  # the run folder's own paths differ between runs
            state = json.loads(data)
            state.pop("config", None)
            state.pop("vae", None)
            data = json.dumps(state, sort_keys=True).encode()
        h.update(path.name.encode() + b"\0" + data)
    return h.hexdigest()


def run_both(work: Path) -> dict[str, str]:
    """Train both tiny runs in `work`; the digest of each one's last checkpoint."""
    import torch

    from models.vae import AutoencoderKL, VAEConfig
    try:
        from models.vae_weights import save_vae
    except ImportError:  # before the weight formats moved out of models/vae.py
        from models.vae import save_vae
    from training.checkpoint import latest_checkpoint
    from training.config import Config, from_dict
    from training.dit_stage import train_dit
    from training.vae_stage import train_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, sample_size=32, force_upcast=False,
                                  scaling_factor=1.0, shift_factor=0.0))
    vae_dir = save_vae(vae, work / "vae")
    train = {"lr": 1e-3, "log_every": 5, "eval_every": 10, "ckpt_every": 0,
             "sample_every": 1000, "precision": "fp32", "device": "cpu", "threads": 1}
    dit = {"description": "weights digest: DiT stage", "stage": "dit", "seed": 3,
           "run_dir": str(work / "dit"), "batch_size": 2,
           "data": {"dataset": "synthetic:24", "resolution": 32, "num_workers": 0,
                    "use_classes": True, "holdout": 4},
           "train": {**train, "max_steps": 30, "grad_accum": 2, "warmup_steps": 5},
           "dit": {"model": "dit-t/2", "vae": str(vae_dir), "sample_sizes": ["32x32"],
                   "sample_steps": 2, "num_samples": 1, "base_tokens": 64}}
    vae_run = {"description": "weights digest: VAE stage", "stage": "vae", "seed": 1,
               "run_dir": str(work / "vae_run"), "batch_size": 2,
               "data": {"dataset": "synthetic:12", "resolution": 32, "num_workers": 0,
                        "holdout": 2},
               "train": {**train, "max_steps": 20},
               "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                       "latent_channels": 4, "disc_start": 8, "disc_warmup": 2, "disc_ramp": 4,
                       "disc_channels": 8, "disc_layers": 2, "eval_crop": 32, "eval_images": 2,
                       "scale_images": 4}}
    return {"dit": digest(latest_checkpoint(train_dit(from_dict(Config, dit)))),
            "vae": digest(latest_checkpoint(train_vae(from_dict(Config, vae_run))))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the digests depend on the order of float sums (also "threads")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LDM_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fresh scan and latent cache
        digests = run_both(Path(tmp))
    print(json.dumps(digests) if args.json else "\n".join(f"{k}: {v}" for k, v in
                                                          digests.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
