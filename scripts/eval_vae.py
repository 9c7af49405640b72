"""Reconstruction quality of a VAE on a folder of images, and a run's PSNR-versus-time curve.

    python scripts/eval_vae.py --vae vae/ --dataset .cache/photos/heldout [--crop 256]
    python scripts/eval_vae.py --curve runs/vae_f8c16

Images are cut into crop×crop squares at native scale (start, centre and end of the long side;
smaller images are resized to cover one square), reconstructed through the posterior mean, and
scored with PSNR and SSIM. The last line printed is one JSON object. Bad input (a missing VAE or
folder, a crop the VAE cannot take, a run without VAE evaluations) is one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CURVE_TAGS = ("loss/rec", "val/psnr", "val/ssim")  # what a VAE run logs (training/vae_stage.py)


def quality(vae_path: str, dataset: str, crop: int, limit: int) -> dict:
    """Mean PSNR/SSIM of posterior-mean reconstructions of the folder's crops.

    Raises FileNotFoundError or ValueError, naming the path or value, for a missing VAE or
    folder, a crop that is not a positive multiple of the VAE's downsampling factor, a
    non-positive limit or a folder without a usable image.
    """
    import torch

    from models.vae_weights import load_vae
    from training.data import resolve_dataset
    from training.scan import scan_folder
    from training.plan import eval_crops
    from training.vae_stage import evaluate

    if crop < 1:
        raise ValueError(f"--crop {crop}: must be a positive multiple of the VAE's "
                         "downsampling factor")
    if limit < 1:
        raise ValueError(f"--limit {limit}: must be positive")
    if not Path(vae_path).exists():
        raise FileNotFoundError(f"{vae_path}: VAE not found; expected a VAE folder (config.json "
                                "+ weights), its config.json or a single weights file")
    root = resolve_dataset(dataset)
    vae = load_vae(vae_path).float().eval()
    factor = vae.downsample_factor
    if crop % factor:
        raise ValueError(f"--crop {crop}: must be a positive multiple of {factor}, the "
                         f"downsampling factor of {vae_path}")
    records = scan_folder(root, num_workers=1).records
    if not records:
        raise ValueError(f"{dataset}: no usable image to evaluate")
    images = eval_crops(records, crop, limit)  # (N, 3, crop, crop) uint8
    psnr, ssim, _ = evaluate(vae, images, torch.device("cpu"))
    return {"vae": vae_path, "dataset": dataset, "images": min(limit, len(records)),
            "crops": len(images), "crop": crop, "psnr": round(psnr, 3), "ssim": round(ssim, 4)}


def _run_kind(tags: set[str]) -> str:
    """What a run looks like from the scalar tags it logged (a phrase)."""
    if "loss/rec" in tags:
        return "a VAE run that has not been evaluated yet"
    if "loss/train" in tags or "loss/val" in tags:
        return "a DiT run (it logs loss/train); --curve reads VAE runs"
    if tags:
        return "no kind of run this script knows"
    return "a run that logged no scalars"


def curve(run_dir: str) -> dict:
    """Held-out PSNR and SSIM against training step and training minutes from TensorBoard.

    A resumed run's abandoned branch is left out (`scripts/loss_curves.py: run_scalars`), and
    so is the time between its processes: minutes count each process's wall time from its first
    logged training loss, after the time of the processes before it up to their last kept one
    (so a resume also leaves out up to one logging interval, its first).
    Raises FileNotFoundError when the run has no events file, ValueError when it lacks one of
    the scalars a VAE run logs (`CURVE_TAGS`).
    """
    from scripts.loss_curves import Scalar, run_scalars

    tb = Path(run_dir) / "tb"
    files = sorted(tb.glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard events file in {tb}")
    scalars = run_scalars(files)
    missing = [tag for tag in CURVE_TAGS if tag not in scalars]
    if missing:
        raise ValueError(f"{run_dir}: no {', '.join(missing)} scalars; it looks like "
                         f"{_run_kind(set(scalars))}")
    first: dict[int, float] = {}  # process -> wall time of its first and last kept loss
    last: dict[int, float] = {}
    for e in scalars["loss/rec"]:
        first.setdefault(e.process, e.wall_time)
        last[e.process] = e.wall_time

    def minutes(e: Scalar) -> float:
        before = sum(last[p] - first[p] for p in first if p < e.process)
        return round((before + e.wall_time - first.get(e.process, e.wall_time)) / 60, 1)

    ssim = {e.step: e.value for e in scalars["val/ssim"]}
    rows = [{"step": e.step, "minutes": minutes(e), "psnr": round(e.value, 2),
             "ssim": round(ssim.get(e.step, float("nan")), 4)} for e in scalars["val/psnr"]]
    return {"run": run_dir, "curve": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the quality of a VAE on a folder, or a run's curve; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="VAE folder, config.json or file")
    parser.add_argument("--dataset", help="folder of images, or synthetic[:N]")
    parser.add_argument("--crop", type=int, default=256,
                        help="square side; a multiple of the VAE's downsampling factor")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many images")
    parser.add_argument("--curve", help="a VAE run folder: print its PSNR-versus-time curve")
    args = parser.parse_args(argv)
    if not args.curve and not (args.vae and args.dataset):
        parser.error("give --vae and --dataset, or --curve")
    try:
        if args.curve:
            result = curve(args.curve)
        else:
            result = quality(args.vae, args.dataset, args.crop, args.limit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in result.get("curve", []):
        print(f"step {row['step']:>6}  {row['minutes']:>6.1f} min  PSNR {row['psnr']:.2f} dB"
              f"  SSIM {row['ssim']:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
