"""Benchmark Inception feature extraction (models/inception.py) against pytorch-fid.

Both networks hold the same weights (--inception FILE, or a random-weight file in the
pt_inception layout written to a temporary folder: speed does not depend on the values) and
take the same uint8 batches from CPU memory: ours as `InceptionFeatures(images)`, pytorch-fid's
`InceptionV3` as `model(images.to(device).float() / 255)`, its `resize_input` path; both return
pool features on the CPU. They run alternately (which goes first alternates too) over several
repeats; the report gives median images/s, their ratio (ours / peer, above 1 means we are
faster), the ratio of each repeat, and the largest relative difference of the features. Both run
with cuDNN's TF32 off (ours always is) unless --peer-tf32 lets pytorch-fid use PyTorch's default.
With --fid-check, the FID of two sets of random images is computed by both libraries at 2048
dimensions (scipy's sqrtm takes tens of seconds on two cores). The last line is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/inception.py --batch 16 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/inception.py` as well as `-m bench.inception`
    sys.path.insert(0, str(REPO))

from bench.vae import timed  # noqa: E402
from models.inception import WEIGHTS_NAME, FIDInceptionV3, InceptionFeatures  # noqa: E402


def random_weights(folder: Path, seed: int) -> Path:
    """A random-weight file in the pt_inception layout: He-normal convolutions and random batch
    norm statistics, so that activations keep their scale through the network (PyTorch's
    default init shrinks them to ~1e-8, which would make --fid-check meaningless)."""
    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, (2 / module.weight[0].numel()) ** 0.5, generator=gen)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
                module.weight.uniform_(0.8, 1.2, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
    path = folder / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


@contextlib.contextmanager
def local_hub(weights: Path) -> Iterator[None]:
    """Point torch hub's cache at a folder holding `weights` under the name pytorch-fid asks for,
    and fail loudly instead of downloading."""
    import torch.hub

    def refuse(url: str, *args, **kwargs) -> None:
        raise RuntimeError(f"pytorch-fid tried to download {url}")

    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / WEIGHTS_NAME).symlink_to(weights.resolve())
        old_dir, old_download = torch.hub.get_dir(), torch.hub.download_url_to_file
        torch.hub.set_dir(hub)
        torch.hub.download_url_to_file = refuse
        try:
            yield
        finally:
            torch.hub.set_dir(old_dir)
            torch.hub.download_url_to_file = old_download


def bench_device(weights: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """Images/s of ours and pytorch-fid's on one device, per-repeat ratios and max rel. diff."""
    from pytorch_fid.inception import InceptionV3

    ours = InceptionFeatures(weights, device, batch_size=args.batch)
    with local_hub(weights):
        peer = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution),
                           dtype=torch.uint8, generator=gen)  # (B, 3, R, R) in CPU memory
    cudnn = torch.backends.cudnn
    peer_flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                      deterministic=cudnn.deterministic,
                      allow_tf32=cudnn.allow_tf32 if args.peer_tf32 else False)

    def run_ours() -> torch.Tensor:
        return ours(images)[0]

    @torch.no_grad()
    def run_peer() -> torch.Tensor:
        with cudnn.flags(**peer_flags):
            return peer(images.to(device).float() / 255)[0].flatten(1).cpu()

    a, b = run_ours(), run_peer().double()  # also the warm-up
    diff = float((a - b).abs().max() / b.abs().max())
    for _ in range(args.warmup):
        run_ours(), run_peer()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        order = [("ours", run_ours), ("peer", run_peer)]
        for who, fn in order if repeat % 2 == 0 else order[::-1]:
            times[who].append(timed(fn, device))
    ours_ips = args.batch / statistics.median(times["ours"])
    peer_ips = args.batch / statistics.median(times["peer"])
    return {"ours_images_per_s": round(ours_ips, 3), "peer_images_per_s": round(peer_ips, 3),
            "ratio": round(ours_ips / peer_ips, 3),
            "repeat_ratios": [round(p / o, 3) for o, p in zip(times["ours"], times["peer"])],
            "max_rel_feature_diff": diff}


def fid_check(weights: Path, device: torch.device, n: int, resolution: int, seed: int) -> dict:
    """FID of two sets of n random images, by training/fid.py and by pytorch-fid's
    `calculate_frechet_distance`, each from its own library's features and statistics."""
    import numpy as np
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    from training.fid import fid, statistics as stats

    gen = torch.Generator().manual_seed(seed + 1)
    sets = [torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8,
                          generator=gen) // (k + 1) for k in range(2)]  # the second one darker
    ours = InceptionFeatures(weights, device)
    with local_hub(weights):
        peer = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    ours_stats, peer_stats = [], []
    for images in sets:
        ours_stats.append(stats(ours(images)[0]))
        with torch.no_grad():
            acts = peer(images.to(device).float() / 255)[0].flatten(1).cpu().numpy()
        peer_stats.append((np.mean(acts, axis=0), np.cov(acts, rowvar=False)))
    start = time.perf_counter()
    value = fid(*ours_stats[0], *ours_stats[1])
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = float(calculate_frechet_distance(*peer_stats[0], *peer_stats[1]))
    peer_s = time.perf_counter() - start
    return {"n": n, "ours": value, "peer": expected, "rel_diff": abs(value - expected) / expected,
            "ours_seconds": round(ours_s, 2), "peer_seconds": round(peer_s, 2)}


def main() -> None:
    """Parse flags, run the benchmark on CPU (and CUDA when present), print JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--inception", type=Path, default=None,
                        help="weights file; default a random-weight file (same speed)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="square image side before the resize to 299")
    parser.add_argument("--batch", type=int, default=16, help="images per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to run on; default cpu, plus cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peer-tf32", action="store_true",
                        help="let pytorch-fid use cuDNN TF32 (PyTorch's default) on the GPU")
    parser.add_argument("--fid-check", type=int, default=0, metavar="N",
                        help="also compare the FID of two sets of N images with pytorch-fid's")
    parser.add_argument("--seed", type=int, default=0, help="weights and images seed")
    args = parser.parse_args()
    if min(args.batch, args.repeats, args.resolution) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --resolution must be positive, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.inception or random_weights(Path(tmp), args.seed)
        if not Path(weights).is_file():
            parser.error(f"--inception: {weights} is not a file")
        report: dict = {"weights": str(args.inception) if args.inception else "random",
                        "resolution": args.resolution, "batch": args.batch,
                        "repeats": args.repeats, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "torch": torch.__version__,
                        "peer_tf32": args.peer_tf32, "results": {}}
        for name in devices:
            device = torch.device(name)
            row = bench_device(Path(weights), device, args)
            if device.type == "cuda":
                row["gpu"] = torch.cuda.get_device_name(device)
            report["results"][name] = row
            print(f"{name}: ours {row['ours_images_per_s']:.2f} img/s, pytorch-fid "
                  f"{row['peer_images_per_s']:.2f} img/s, ratio {row['ratio']:.3f} "
                  f"(repeats {row['repeat_ratios']}), max rel. feature diff "
                  f"{row['max_rel_feature_diff']:.1e}")
        if args.fid_check:
            check = fid_check(Path(weights), torch.device(devices[0]), args.fid_check,
                              args.resolution, args.seed)
            report["fid_check"] = check
            print(f"FID of {check['n']} vs {check['n']} images: ours {check['ours']:.6f}, "
                  f"pytorch-fid {check['peer']:.6f}, rel. diff {check['rel_diff']:.1e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
