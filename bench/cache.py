"""Benchmark the latent cache (training/latent_cache/) against its peers, measured in the same run.

(a) Training batches per second served from the cache (memory-mapped moments plus a fresh
    sample) against loading, decoding, resizing and encoding the same batches on the fly.
(b) Cache-building images/s on generated 1-megapixel JPEGs against the bare VAE encoder on the
    same crops already in memory (the build decodes in DataLoader workers while the VAE encodes).
(c) Peak RSS of a build of N and of 4N images, each in its own subprocess (VmHWM on Linux), as
    the growth over the resident set before the build (torch and the VAE are not the build's).

The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/cache.py` as well as `python -m bench.cache`
    sys.path.insert(0, str(REPO))

from training.plan import bucket_dataset  # noqa: E402
from models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from models.vae_weights import load_vae  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.images import crop_to_bucket, load_image, to_unit_range  # noqa: E402
from training.latent_cache.build import ensure_cache  # noqa: E402
from training.latent_cache.read import LatentReader, step_generator  # noqa: E402

DEFAULT_VAE = REPO / "vae"
# Used when vae/ holds no VAE: the shape the VAE stage trains (f = 8, 16 latent channels).
SMALL_F8 = VAEConfig(block_out_channels=(32, 64, 128, 128), latent_channels=16,
                     layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
                     use_quant_conv=False, use_post_quant_conv=False, sample_size=256,
                     scaling_factor=1.0)
MEGAPIXEL_SIZES = [(1152, 864), (864, 1152), (1024, 1024)]  # about 1 MP, three buckets


def make_vae(path: Path | None, seed: int) -> tuple[AutoencoderKL, str]:
    """The default VAE from `vae/` when it holds one, else the small f8 layout at random."""
    path = path or (DEFAULT_VAE if (DEFAULT_VAE / "config.json").is_file() else None)
    if path is not None:
        return load_vae(path), str(path)
    torch.manual_seed(seed)
    return AutoencoderKL(SMALL_F8).eval(), "small-f8 (random weights)"


def write_photos(root: Path, count: int, sizes: list[tuple[int, int]], seed: int) -> Path:
    """`count` photo-like JPEGs (smooth shapes plus sensor noise) cycling through `sizes`."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, size=(h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        img += rng.normal(0, 6, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg",
                                                                    quality=90)
    return root


def plan(root: Path, resolution: int):
    """Scan and bucket a folder the way training does (no bucket merging)."""
    cfg = DataConfig(dataset=str(root), resolution=resolution, merge_small_buckets=False)
    scan, buckets, placements = bucket_dataset(cfg)
    return scan.records, buckets, placements


def crops(records, placements) -> list[torch.Tensor]:
    """The bucket crops as uint8 (3, H, W), decoded exactly as the cache decodes them."""
    out = []
    for rec, p in zip(records, placements):
        img = load_image(rec.path, min_size=p.resized)
        out.append(torch.from_numpy(crop_to_bucket(img, p.resized, p.crop)).permute(2, 0, 1))
    return out


def bucket_batches(placements, buckets, batch: int) -> list[list[int]]:
    """Batches of one bucket each, in the order the cache builder forms them."""
    order = sorted(range(len(placements)), key=lambda i: (tuple(buckets[placements[i].bucket]),
                                                          i))
    out: list[list[int]] = []
    for i in order:
        if not out or len(out[-1]) >= batch or placements[out[-1][0]].bucket != \
                placements[i].bucket:
            out.append([])
        out[-1].append(i)
    return out


@torch.inference_mode()
def bare_encoder_ips(vae, pixels: list[torch.Tensor], batches: list[list[int]]) -> float:
    """Images/s of vae.encode alone on crops already in memory."""
    start = time.perf_counter()
    for b in batches:
        vae.encode(to_unit_range(torch.stack([pixels[i] for i in b])))  # (B, 3, H, W)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def bench_build(vae, records, buckets, placements, args, work: Path) -> dict:
    """(b): cache building against the bare encoder, alternating, medians of the repeats."""
    pixels = crops(records, placements)
    batches = bucket_batches(placements, buckets, args.batch)
    bare_encoder_ips(vae, pixels, batches[:1])  # warm up
    bare, build, last = [], [], None
    for r in range(args.repeats):  # alternate which goes first: the machine's load drifts
        if r % 2 == 0:
            bare.append(bare_encoder_ips(vae, pixels, batches))
        start = time.perf_counter()
        last = ensure_cache(records, placements, buckets, vae, work / f"build{r}",
                            batch_size=args.batch, num_workers=args.workers,
                            progress=False)
        build.append(last.encoded / (time.perf_counter() - start))
        if r % 2 == 1:
            bare.append(bare_encoder_ips(vae, pixels, batches))
    return {"images": len(records), "bare_encoder_images_per_s": round(statistics.median(bare), 3),
            "build_images_per_s": round(statistics.median(build), 3),
            "ratio": round(statistics.median(build) / statistics.median(bare), 3),
            "num_workers": args.workers, "summary": last.to_json()}


@torch.inference_mode()
def bench_training(vae, records, buckets, placements, keys, cache_dir: Path, args) -> dict:
    """(a): batches/s from the cache against decoding and encoding the same batches."""
    plan_batches = bucket_batches(placements, buckets, args.batch)
    reader = LatentReader(cache_dir, keys, vae.config.latent_affine())
    fly = plan_batches[:args.fly_batches]
    start = time.perf_counter()
    for step, b in enumerate(fly):
        x = torch.stack([torch.from_numpy(crop_to_bucket(
            load_image(records[i].path, min_size=placements[i].resized),
            placements[i].resized, placements[i].crop)).permute(2, 0, 1) for i in b])
        gen = step_generator(args.seed, step)
        vae.normalize(vae.encode(to_unit_range(x)).sample(gen))  # (B, C, h, w)
    fly_bps = len(fly) / (time.perf_counter() - start)
    steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:
        b = plan_batches[steps % len(plan_batches)]
        reader.batch(b, step_generator(args.seed, steps))
        steps += 1
    cached_bps = steps / (time.perf_counter() - start)
    reader.close()
    return {"batch": args.batch, "on_the_fly_batches_per_s": round(fly_bps, 3),
            "cached_batches_per_s": round(cached_bps, 1), "ratio": round(cached_bps / fly_bps, 1)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM where Linux has it (ru_maxrss of a child
    started by exec counts the parent's memory at fork time), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(root: Path, cache_dir: Path, resolution: int, args) -> None:
    """(c), in a subprocess: build the cache of `root`, print peak RSS as JSON."""
    vae, _ = make_vae(args.vae, args.seed)
    records, buckets, placements = plan(root, resolution)
    before = peak_rss_mb()
    summary = ensure_cache(records, placements, buckets, vae, cache_dir,
                           batch_size=args.batch, num_workers=args.workers, progress=False)
    print(json.dumps({"images": summary.encoded, "max_rss_before_build_mb": before,
                      "max_rss_mb": peak_rss_mb(), "cache_mb": summary.bytes / 2**20}))


def bench_rss(args, work: Path) -> dict:
    """(c): peak RSS of building N and 4N images, each in a fresh process."""
    out = {}
    for count in (args.rss_images, 4 * args.rss_images):
        root = write_photos(work / f"rss{count}", count, [(384, 288), (288, 384), (320, 320)],
                            args.seed)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(root),
               "--rss-cache", str(work / f"rss-cache{count}"), "--batch", str(args.batch),
               "--workers", str(args.workers), "--rss-resolution", str(args.rss_resolution)]
        if args.vae:
            cmd += ["--vae", str(args.vae)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[count] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = out[args.rss_images], out[4 * args.rss_images]
    growth = {k: v["max_rss_mb"] - v["max_rss_before_build_mb"] for k, v in out.items()}
    return {"resolution": args.rss_resolution, "n": small["images"],
            "n_max_rss_mb": round(small["max_rss_mb"], 1),
            "n_max_rss_before_build_mb": round(small["max_rss_before_build_mb"], 1),
            "n_growth_mb": round(growth[args.rss_images], 1),
            "n_cache_mb": round(small["cache_mb"], 2),
            "4n": large["images"], "4n_max_rss_mb": round(large["max_rss_mb"], 1),
            "4n_max_rss_before_build_mb": round(large["max_rss_before_build_mb"], 1),
            "4n_growth_mb": round(growth[4 * args.rss_images], 1),
            "4n_cache_mb": round(large["cache_mb"], 2),
            # the build's own memory (peak over the baseline), 4N images against N: 1 when it
            # streams; keeping the latents would add the difference of the cache sizes
            "ratio": round(growth[4 * args.rss_images] / growth[args.rss_images], 3)}


def main() -> None:
    """Run (a), (b) and (c) and print the JSON report last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vae", type=Path, default=None,
                        help=f"VAE folder; default {DEFAULT_VAE} if it holds one, else a small "
                             "f8 layout (32,64,128,128; 16 latent channels) at random")
    parser.add_argument("--images", type=int, default=24, help="1-megapixel JPEGs for (a), (b)")
    parser.add_argument("--resolution", type=int, default=256, help="bucket resolution")
    parser.add_argument("--batch", type=int, default=4, help="images per encoder call / batch")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers of the build")
    parser.add_argument("--repeats", type=int, default=4, help="alternating repeats in (b)")
    parser.add_argument("--fly-batches", type=int, default=3, help="on-the-fly batches in (a)")
    parser.add_argument("--rss-images", type=int, default=24, help="N in (c)")
    parser.add_argument("--rss-resolution", type=int, default=64, help="resolution in (c)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_cache, args.rss_resolution, args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        os.environ["LDM_CACHE_DIR"] = str(work / "ldm")  # scan cache stays in the temp folder
        vae, vae_name = make_vae(args.vae, args.seed)
        root = write_photos(work / "photos", args.images, MEGAPIXEL_SIZES, args.seed)
        records, buckets, placements = plan(root, args.resolution)
        build = bench_build(vae, records, buckets, placements, args, work)
        summary = ensure_cache(records, placements, buckets, vae, work / "build0",
                               progress=False)
        training = bench_training(vae, records, buckets, placements, summary.keys,
                                  work / "build0", args)
        rss = bench_rss(args, work)
    build.pop("summary")
    report = {"vae": vae_name, "resolution": args.resolution, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "training_batches": training, "build": build,
              "peak_rss": rss}
    print(f"(a) training batches/s: cache {training['cached_batches_per_s']}, on the fly "
          f"{training['on_the_fly_batches_per_s']} ({training['ratio']}x)")
    print(f"(b) build {build['build_images_per_s']} images/s vs bare encoder "
          f"{build['bare_encoder_images_per_s']} ({build['ratio']:.0%})")
    print(f"(c) peak RSS growth while building: {rss['n']} images {rss['n_growth_mb']} MB, "
          f"{rss['4n']} images {rss['4n_growth_mb']} MB (x{rss['ratio']}; caches of "
          f"{rss['n_cache_mb']} and {rss['4n_cache_mb']} MB)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
