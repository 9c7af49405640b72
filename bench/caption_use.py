"""How much a text-conditioned DiT uses its captions: validation loss with the right captions
against the same images with shuffled captions, after a short run.

A model that ignores its captions scores 0 (the two losses are equal); the more the captions
tell it, the larger `gain` = loss(shuffled) − loss(right). Each recipe (dotted config overrides
over `--config`, like bench/convergence.py) trains `--steps` steps on the synthetic captions at
`--resolution` in this process, then its EMA model is scored on the held-out images at t = 0.5
and 0.8 with seeded noise; each held-out image's caption is swapped with its neighbour's (in
bucket order) for the shuffled loss. `class` recipes (`{"data.use_classes": true}`) train on
the families as class labels instead and shuffle the labels, for comparison. The last line
printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/caption_use.py --steps 800 --resolution 64 \\
        --recipe depth2='{"text.depth": 2}' --recipe class='{"data.use_classes": true}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/caption_use.py`
    sys.path.insert(0, str(REPO))


def score(cfg, run_dir: Path) -> dict:
    """Validation loss of the run's EMA model with right and with shuffled conditions."""
    from models.vae_weights import vae_fingerprint
    from training.conditions import run_condition
    from training.distributed import DistInfo
    from training.dit_stage import validation_latents
    from training.export import load_generator
    from training.flow import RectifiedFlow
    from training.plan import plan_data

    model, vae, _ = load_generator(run_dir)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, info)
    val = validation_latents(cfg, plan, vae, info, vae_fingerprint(vae),
                             run_condition(cfg, plan, info).evaluate)
    flow = RectifiedFlow(model.condition, model.config.patch_size)
    generator = torch.Generator().manual_seed(0)
    right = shuffled = count = 0.0
    for x0, cond in val:
        swap = torch.roll(torch.arange(len(x0)), 1).tolist()
        other = (cond[swap] if isinstance(cond, torch.Tensor)
                 else model.condition.batch([cond.texts[i] for i in swap]))
        for t in (0.5, 0.8):
            noise = torch.randn(x0.shape, generator=generator)
            times = torch.full((len(x0),), t)
            with torch.no_grad():
                right += float(flow._velocity_loss(model, x0, noise, times, cond).sum())
                shuffled += float(flow._velocity_loss(model, x0, noise, times, other).sum())
            count += len(x0)
    return {"loss_right": round(right / count, 4), "loss_shuffled": round(shuffled / count, 4),
            "gain": round((shuffled - right) / count, 4)}


def main() -> None:
    """Train and score every recipe; print one line each, then the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--config", default=str(REPO / "configs" / "default.json"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from dotenv import load_dotenv

    from training.config import apply_overrides, load_config
    from training.dit_stage import train_dit

    load_dotenv(REPO / ".env")  # LDM_CACHE_DIR: the synthetic set and the latent cache
    torch.set_num_threads(args.threads)
    recipes = [("default", {})] + [(text.split("=", 1)[0], json.loads(text.split("=", 1)[1]))
                                   for text in args.recipe]
    work = Path(tempfile.mkdtemp(prefix="caption_use-"))
    rows = []
    for name, overrides in recipes:
        cfg = load_config(args.config)
        classes = bool(overrides.get("data.use_classes"))
        apply_overrides(cfg, {"data.dataset": "synthetic", "data.captions": not classes,
                              "data.resolution": args.resolution, "data.holdout": args.holdout,
                              "dit.val_images": args.holdout, "seed": args.seed,
                              "train.max_steps": args.steps, "train.threads": args.threads,
                              "train.eval_every": 10**9, "train.sample_every": 10**9,
                              "train.ckpt_every": 0, "run_dir": str(work / name)})
        apply_overrides(cfg, overrides)
        start = time.perf_counter()
        run_dir = train_dit(cfg)
        row = {"name": name, "overrides": overrides,
               "train_s": round(time.perf_counter() - start, 1), **score(cfg, run_dir)}
        rows.append(row)
        print(f"{name}: gain {row['gain']} (right {row['loss_right']}, shuffled "
              f"{row['loss_shuffled']}) in {row['train_s']} s", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "caption_use", "steps": args.steps,
                      "resolution": args.resolution, "threads": args.threads,
                      "work": str(work), "rows": rows}))


if __name__ == "__main__":
    main()
