"""How many VAE steps fit in a time budget on this machine: times the real data loader and the
real training step of a VAE config, then prints max_steps for `train.py --max-steps`.

    python scripts/gpu_vae_steps.py --config configs/vae_f8c16_gpu.json --dataset DIR --seconds 150

The step is timed on random pixels (encode, decode, L1 + KL, backward, Adam) under the config's
precision; the loader on the config's data with its worker count. A step takes the slower of
the two, as they overlap. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import apply_overrides, load_config  # noqa: E402
from training.data import resolve_dataset  # noqa: E402
from training.distributed import setup  # noqa: E402
from training.loop import autocast, autocast_dtype, pixel_loader, plan_data  # noqa: E402
from training.vae_stage import build_vae  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Time loader and step, print the step budget; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="training time budget")
    parser.add_argument("--fraction", type=float, default=0.85,
                        help="share of the budget for steps (the rest: start-up, eval, export)")
    args = parser.parse_args(argv)
    try:
        if not args.seconds > 0:
            raise ValueError(f"--seconds {args.seconds}: must be positive")
        if not 0 < args.fraction <= 1:
            raise ValueError(f"--fraction {args.fraction}: must lie in (0, 1]")
        cfg = apply_overrides(load_config(args.config), {"data.dataset": args.dataset})
        resolve_dataset(cfg.data.dataset)
        info = setup(cfg.train.device)
        device = info.device
        plan = plan_data(cfg, info)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loader = iter(pixel_loader(cfg, plan, info, 0, 0, random_crop=True))
    next(loader)  # workers started
    start = time.perf_counter()
    for _ in range(20):
        next(loader)
    load_s = (time.perf_counter() - start) / 20

    vae = build_vae(cfg).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    amp = autocast_dtype(cfg.train.precision, device)
    side = cfg.data.resolution
    x = torch.rand(cfg.batch_size, 3, side, side, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, amp):
            posterior = vae.encode(x)
            rec = vae.decode(posterior.sample())
            loss = (rec.float() - x).abs().mean() + 1e-6 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / 20
    per_step = max(step_s, load_s)
    steps = max(100, int(args.seconds * args.fraction / per_step) // 100 * 100)
    print(json.dumps({"loader_s_per_batch": round(load_s, 4), "step_s": round(step_s, 4),
                      "batch": cfg.batch_size, "max_steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
