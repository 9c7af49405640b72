"""Reconstruction quality of a VAE on a folder of images, and a run's PSNR-versus-time curve.

    python scripts/eval_vae.py --vae vae/ --dataset .cache/photos/heldout [--crop 256]
    python scripts/eval_vae.py --curve runs/vae_f8c16

Images are cut into crop×crop squares at native scale (start, centre and end of the long side;
smaller images are resized to cover one square), reconstructed through the posterior mean, and
scored with PSNR and SSIM. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def quality(vae_path: str, dataset: str, crop: int, limit: int) -> dict:
    """Mean PSNR/SSIM of posterior-mean reconstructions of the folder's crops."""
    import torch

    from models.vae import load_vae
    from training.data import resolve_dataset, scan_folder
    from training.loop import eval_crops
    from training.vae_stage import evaluate

    vae = load_vae(vae_path).float().eval()
    records = scan_folder(resolve_dataset(dataset), num_workers=1).records
    images = eval_crops(records, crop, limit)
    psnr, ssim, _ = evaluate(vae, images, torch.device("cpu"))
    return {"vae": vae_path, "dataset": dataset, "images": min(limit, len(records)),
            "crops": len(images), "crop": crop, "psnr": round(psnr, 3), "ssim": round(ssim, 4)}


def curve(run_dir: str) -> dict:
    """Held-out PSNR and SSIM against training step and wall-clock minutes from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"))
    events.Reload()
    start = min(e.wall_time for e in events.Scalars("loss/rec"))
    ssim = {e.step: e.value for e in events.Scalars("eval/ssim")}
    rows = [{"step": e.step, "minutes": round((e.wall_time - start) / 60, 1),
             "psnr": round(e.value, 2), "ssim": round(ssim.get(e.step, float("nan")), 4)}
            for e in events.Scalars("eval/psnr")]
    return {"run": run_dir, "curve": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="VAE folder, config.json or file")
    parser.add_argument("--dataset", help="folder of images, or synthetic[:N]")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--limit", type=int, default=1000, help="at most this many images")
    parser.add_argument("--curve", help="a VAE run folder: print its PSNR-versus-time curve")
    args = parser.parse_args()
    if args.curve:
        result = curve(args.curve)
        for row in result["curve"]:
            print(f"step {row['step']:>6}  {row['minutes']:>6.1f} min  PSNR {row['psnr']:.2f} dB"
                  f"  SSIM {row['ssim']:.4f}")
    else:
        if not (args.vae and args.dataset):
            parser.error("give --vae and --dataset, or --curve")
        result = quality(args.vae, args.dataset, args.crop, args.limit)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
