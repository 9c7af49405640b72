"""Start-up over folders of many small image files: how it grows with the number of files.

For each folder size N (`--sizes`, default 50 000 and 200 000) the script makes once, under
`--work` (default .cache/bench_startup/, reused while its parameters match): N 64x64 PNGs in
sub-folders of 1 000, each a different picture (seeded smooth colour fields: no two files are
exact duplicates, which training would fold); the latent cache of the folder at resolution 64,
built by a real start of the run; and a checkpoint after two real training steps. Each size
has its own cache folder, scan cache and runs. Then each of these runs in a fresh process:

  first start   a new run over the folder with an empty scan cache, the image files dropped
                from the page cache too: every file is read, hashed and decoded (the peer)
  second start  a new run over the unchanged folder, after the first start
  resume        the checkpoint's run resumed (`--resume`), mid-epoch

The run is configs/default.json with data.resolution 64, the folder, its cache, dit-t/2 and
`--vae`. Start-up is everything `training.dit_stage.train_dit` does before its first optimizer
step: load the VAE and fingerprint it; scan the folder (scan cache: stat every file, read the
rows), fold duplicates, bucket, hold out validation images, build the batch schedule; check the
latent cache (locate every entry, stamp the shards, sample rows) and open the reader; cache and
read the validation latents; build the model and optimizer; load the checkpoint and find the
resume position (resume); read the first micro-batch from the cache. The child process runs
train_dit itself with its training loop replaced by one that takes the first micro-batch and
returns, so nothing of the model's compute is counted.

Measured per process: `wall_s`, from spawning the process to its exit (Python and torch imports
included), and `startup_s`, train_dit up to the first micro-batch, with its phases; bytes read
from the latent cache folder: before the process starts every file in it (and the scan cache)
is fsynced and dropped from the page cache (posix_fadvise DONTNEED, no root needed), and after
it exits the pages resident again are counted with mincore (readahead included: bytes that were
read from the disk); the process's own /proc/self/io read_bytes as a cross-check; peak RSS
(VmHWM), its growth over the resident set after the imports, and the resident pages of the
latent shards the process has mapped at its end (/proc/self/smaps), which the peak includes.
`growth_per_file` compares the smallest and the largest size: the difference of each figure
over the difference in files. Targets (issue 17, at the largest size): an unchanged start and a
resume under 60 s, bytes read under 1 % of the cache folder, peak RSS growth under 100 bytes
per file. The peer is the first start measured in the same run; there is no older start-up to
compare against in the same process.

The default VAE (`--vae tiny`, saved under --work) has the shipped VAE's latent shape (f8, 16
channels: 8x8 latents at 64 px, 4 KiB an entry) at a fraction of its cost: the shipped `vae/`
encodes about 100 images/s on 2 CPU cores, so caching 200 000 images with their mirrored crops
would take over an hour; start-up itself does not encode and reads the same bytes either way.
`--vae vae` uses the shipped one.

The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/startup.py
    UV_CACHE_DIR=.uv-cache uv run python bench/startup.py --sizes 2000 8000  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/startup.py` as well as `python -m ...`
    sys.path.insert(0, str(REPO))

VERSION = 1  # of the prepared folders: a change here makes them again
FOLDER_FILES = 1000  # image files per sub-folder
SIDE = 64  # pixels a side of every image, and the bucket resolution
CKPT_STEPS = 2  # real training steps before the checkpoint that `resume` continues
TARGETS = {"start_s": 60.0, "read_fraction": 0.01, "rss_bytes_per_file": 100.0}
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the data -----------------------------------------------------------------------------------
def _write_folder(folder: Path, first: int, count: int, seed: int) -> None:
    """`count` PNGs numbered from `first`: smooth random colour fields, one seed each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, i])
        cells = int(rng.integers(3, 9))
        coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC)
        image.save(folder / f"{i:07d}.png")


def make_images(root: Path, count: int, seed: int, workers: int) -> Path:
    """`count` 64x64 PNGs in sub-folders of FOLDER_FILES, written into a temporary sibling
    and renamed into place, so an interrupted run never leaves a partial folder behind."""
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(tmp / f"d{k:04d}", first, min(FOLDER_FILES, count - first), seed)
            for k, first in enumerate(range(0, count, FOLDER_FILES))]
    if len(jobs) == 1 or workers < 2:
        for job in jobs:
            _write_folder(*job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for done in [pool.submit(_write_folder, *job) for job in jobs]:
                done.result()
    os.replace(tmp, root)
    return root


def tiny_vae_folder(work: Path) -> Path:
    """A saved VAE of the shipped one's latent shape (f8, 16 channels), seeded, made once."""
    import torch

    from models.vae import AutoencoderKL, VAEConfig
    from models.vae_weights import save_vae

    folder = work / "tiny_vae"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = VAEConfig(block_out_channels=(8, 8, 8, 16), latent_channels=16,
                           layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
                           use_quant_conv=False, use_post_quant_conv=False, sample_size=SIDE)
        save_vae(AutoencoderKL(config).eval(), folder)
    return folder


# -- page cache ---------------------------------------------------------------------------------
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def drop_from_page_cache(paths: list[Path], flush: bool = True) -> None:
    """Write back and evict the cached pages of `paths` (DONTNEED skips dirty pages)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if flush:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (whole pages), by mincore on a mapping that is never
    touched (mapping a file reads nothing)."""
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    if size == 0:
        os.close(fd)
        return 0
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"{path}: mmap failed")
    finally:
        os.close(fd)
    try:
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"{path}: mincore failed")
    finally:
        _libc.munmap(addr, size)
    return int((np.frombuffer(vector, np.uint8) & 1).sum()) * PAGE


# -- the child: one start-up ---------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _mapped_rss_kb(folder: str) -> int:
    """Resident kB of this process's mappings of files under `folder`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].startswith(folder)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def run_config(size_dir: Path, vae: Path, run_dir: Path, max_steps: int):
    """The benchmark's run: configs/default.json at 64 px over the folder of `size_dir`."""
    from training.config import REPO_ROOT, load_config

    cfg = load_config(REPO_ROOT / "configs" / "default.json")
    cfg.stage, cfg.run_dir = "dit", str(run_dir)
    cfg.data.dataset, cfg.data.resolution = str(size_dir / "images"), SIDE
    cfg.dit.model, cfg.dit.vae, cfg.dit.cache_dir = "dit-t/2", str(vae), str(size_dir / "latents")
    cfg.train.device, cfg.train.precision, cfg.train.max_steps = "cpu", "fp32", max_steps
    cfg.train.ckpt_every = cfg.train.eval_every = cfg.train.sample_every = 10**6
    return cfg


def build_cache(size_dir: Path, vae: Path) -> None:
    """Encode the run's training images into its latent cache, 64 images per encoder call
    (a start encodes at most batch-size images per call), in this process."""
    import torch

    from training.distributed import DistInfo
    from training.dit_stage import load_stage_vae
    from training.latent_cache.build import ensure_cache
    from training.plan import plan_data

    cfg = run_config(size_dir, vae, size_dir / "runs" / "ckpt", CKPT_STEPS)
    before = {k: os.environ.get(k) for k in ("LDM_CACHE_DIR", "TQDM_DISABLE")}
    os.environ.update(LDM_CACHE_DIR=str(size_dir / "ldm"), TQDM_DISABLE="1")  # the run's scan
    try:  # the plan prints its summary: stdout carries only the report
        with contextlib.redirect_stdout(sys.stderr):
            plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
            ensure_cache(plan.records, plan.placements, plan.buckets,
                         load_stage_vae(cfg, torch.device("cpu")), cfg.dit.cache_dir,
                         flip=cfg.data.flip, batch_size=64, num_workers=cfg.data.num_workers,
                         progress=False, log=lambda message: None)
    finally:
        for key, value in before.items():
            os.environ.pop(key)
            if value is not None:
                os.environ[key] = value


def child(args: argparse.Namespace) -> None:
    """One start-up in this fresh process; prints its figures as JSON."""
    import training.dit_stage as stage

    size_dir = Path(args.child_size_dir)
    resume = args.child_mode == "resume"
    run_dir = size_dir / "runs" / ("ckpt" if args.child_mode in ("resume", "checkpoint")
                                   else args.child_mode)
    max_steps = CKPT_STEPS * (2 if resume else 1)
    cfg = run_config(size_dir, Path(args.child_vae), run_dir, max_steps)
    marks: dict[str, float] = {}
    found: dict[str, int] = {}

    def timed(name: str, func):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                out = func(*a, **k)
            finally:
                marks[name] = marks.get(name, 0.0) + time.perf_counter() - start
            if name == "plan":
                found["images"] = len(out.records)
            return out
        return wrapper

    for name, attr in (("vae", "load_stage_vae"), ("plan", "plan_data"),
                       ("latent_cache", "cache_latents"), ("validation", "validation_latents"),
                       ("checkpoint", "load_checkpoint")):
        if hasattr(stage, attr):
            setattr(stage, attr, timed(name, getattr(stage, attr)))
    real_loop = stage.train_loop
    end = {}

    def first_batch_only(*a, **k):
        batches = inspect.signature(real_loop).bind(*a, **k).arguments["batches"]
        start = time.perf_counter()
        next(batches)  # the first micro-batch, on the device: start-up is over
        end["time"] = time.perf_counter()
        marks["first_batch"] = end["time"] - start
        end["maps_kb"] = _mapped_rss_kb(cfg.dit.cache_dir)
        end["hwm_kb"] = _status_kb("VmHWM")
        return k.get("step", a[3] if len(a) > 3 else 0)

    if args.child_mode != "checkpoint":  # which trains CKPT_STEPS steps and saves
        stage.train_loop = first_batch_only
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    stage.train_dit(cfg, "" if resume else None)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    out = {"startup_s": end.get("time", time.perf_counter()) - start,
           "phases_s": {k: round(v, 3) for k, v in marks.items()},
           "images": found.get("images"), "base_rss_mb": base_kb / 1024,
           "peak_rss_mb": end.get("hwm_kb", _status_kb("VmHWM")) / 1024,
           "latent_maps_rss_mb": end.get("maps_kb", 0) / 1024,
           "process_read_bytes": int(io["read_bytes"])}
    print(json.dumps(out))


# -- the parent ---------------------------------------------------------------------------------
def _spawn(args: argparse.Namespace, mode: str, size_dir: Path, vae: Path, log: Path) -> dict:
    """Run one child; returns its JSON with the wall time added."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-mode", mode,
           "--child-size-dir", str(size_dir), "--child-vae", str(vae)]
    env = {**os.environ, "LDM_CACHE_DIR": str(size_dir / "ldm"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"\n== {mode} ==\n")
        err.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                              cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{mode} over {size_dir} failed ({done.returncode}); see {log}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def prepare(args: argparse.Namespace, count: int, vae: Path) -> Path:
    """The folder, latent cache and checkpoint of one size, made once (`ready.json`)."""
    size_dir = args.work / f"n{count}"
    stamp = {"version": VERSION, "files": count, "seed": args.seed, "vae": str(vae)}
    ready = size_dir / "ready.json"
    if ready.is_file() and json.loads(ready.read_text()) == stamp:
        return size_dir
    for name in ("latents", "ldm", "runs"):
        shutil.rmtree(size_dir / name, ignore_errors=True)
    ready.unlink(missing_ok=True)
    print(f"preparing {count} files in {size_dir} ...", file=sys.stderr, flush=True)
    make_images(size_dir / "images", count, args.seed, args.workers)
    build_cache(size_dir, vae)
    ready.write_text(json.dumps(stamp))
    return size_dir


def ensure_checkpoint(args: argparse.Namespace, size_dir: Path, vae: Path) -> None:
    """The checkpoint `resume` continues: CKPT_STEPS real training steps, once."""
    if not list((size_dir / "runs" / "ckpt" / "checkpoints").glob("step_*")):
        shutil.rmtree(size_dir / "runs" / "ckpt", ignore_errors=True)
        _spawn(args, "checkpoint", size_dir, vae, size_dir / "log.txt")


def measure(args: argparse.Namespace, size_dir: Path, vae: Path, mode: str) -> dict:
    """One start-up of `mode` in a fresh process, with the page cache of the latent cache (and
    for the first start the scan cache and images) dropped first."""
    cache, scan = size_dir / "latents", size_dir / "ldm" / "scan"
    if mode == "first_start":
        shutil.rmtree(scan, ignore_errors=True)
        os.sync()
        drop_from_page_cache(_files(size_dir / "images"), flush=False)
    if mode != "resume":
        shutil.rmtree(size_dir / "runs" / mode, ignore_errors=True)
    drop_from_page_cache(_files(cache) + _files(scan))
    left = sum(resident_bytes(p) for p in _files(cache))
    load = os.getloadavg()[0]
    out = _spawn(args, mode, size_dir, vae, size_dir / "log.txt")
    out["load_before"] = load  # other work on the machine (1-minute load average)
    files = _files(cache)
    index = [p for p in files if p.parent == cache]
    out["cache_bytes"] = sum(p.stat().st_size for p in files)
    out["cache_read_bytes"] = sum(resident_bytes(p) for p in files)
    out["index_read_bytes"] = sum(resident_bytes(p) for p in index)
    out["scan_cache_read_bytes"] = sum(resident_bytes(p) for p in _files(scan))
    out["cache_read_fraction"] = out["cache_read_bytes"] / out["cache_bytes"]
    out["resident_before_bytes"] = left
    out["rss_growth_mb"] = out["peak_rss_mb"] - out["base_rss_mb"]
    return out


def _round(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    return value


def growth(small: dict, large: dict, files: int) -> dict:
    """Per-file growth of one run kind's figures between two sizes (`files` apart)."""
    return {"startup_us_per_file": 1e6 * (large["startup_s"] - small["startup_s"]) / files,
            "wall_us_per_file": 1e6 * (large["wall_s"] - small["wall_s"]) / files,
            "rss_bytes_per_file": 2**20 * (large["rss_growth_mb"] - small["rss_growth_mb"])
            / files,
            "cache_read_bytes_per_file": (large["cache_read_bytes"] - small["cache_read_bytes"])
            / files}


def main() -> None:
    """Prepare every size, measure the three start-ups of each, print the JSON report last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000],
                        help="image files per folder (at least two sizes for the growth)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench_startup",
                        help="where the folders, caches and runs are made and kept")
    parser.add_argument("--vae", default="tiny",
                        help="tiny (a saved VAE of vae/'s latent shape) or a VAE folder")
    parser.add_argument("--runs", nargs="+", default=["first_start", "second_start", "resume"],
                        choices=["first_start", "second_start", "resume"])
    parser.add_argument("--workers", type=int, default=2, help="processes writing images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-size-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-vae", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mode:
        child(args)
        return
    if len(args.sizes) < 2 or min(args.sizes) < 1 or len(set(args.sizes)) < len(args.sizes):
        parser.error("--sizes needs at least two different positive sizes")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    vae = tiny_vae_folder(args.work) if args.vae == "tiny" else Path(args.vae).resolve()
    sizes = sorted(args.sizes)
    results = {}
    for count in sizes:
        size_dir = prepare(args, count, vae)
        if "resume" in args.runs:
            ensure_checkpoint(args, size_dir, vae)
        runs = {}
        for mode in args.runs:
            runs[mode] = measure(args, size_dir, vae, mode)
            print(f"{count} files, {mode}: {runs[mode]['wall_s']:.1f} s (start-up "
                  f"{runs[mode]['startup_s']:.1f} s), read {runs[mode]['cache_read_bytes']} B "
                  f"of {runs[mode]['cache_bytes']} B, peak RSS {runs[mode]['peak_rss_mb']:.0f} "
                  "MB", file=sys.stderr, flush=True)
        results[str(count)] = {"files": count, **runs}
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    per_file = {mode: growth(small[mode], large[mode], sizes[-1] - sizes[0])
                for mode in args.runs}
    unchanged = [m for m in ("second_start", "resume") if m in args.runs]
    meets = {f"{m}_{k}": ok for m in unchanged for k, ok in (
        ("start_s", large[m]["wall_s"] < TARGETS["start_s"]),
        ("read_fraction", large[m]["cache_read_fraction"] < TARGETS["read_fraction"]),
        ("rss_bytes_per_file", per_file[m]["rss_bytes_per_file"] < TARGETS["rss_bytes_per_file"]))}
    import torch

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "vae": args.vae, "resolution": SIDE, "sizes": sizes, "results": results,
              "growth_per_file": per_file, "targets": TARGETS, "meets": meets}
    print(json.dumps(_round(report)))


if __name__ == "__main__":
    main()
