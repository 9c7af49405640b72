"""ADM sample batches for FID-50K: sample N images into an .npz, in chunks that survive a kill.

The file is what guided-diffusion's `evaluations/evaluator.py` and `scripts/evaluate.py` read:
`arr_0`, uint8 (N, H, W, 3), and for a class-conditional model `arr_1`, int64 (N,) class labels.

Sample i is drawn from noise seeded with seed + i (`pipelines.initial_noise`) under the label
the caller gives it (the command line cycles through the classes: i mod num_classes), so which
process or batch draws it does not change it. The samples are cut into chunks of `chunk_size`
(chunk c holds samples c·K .. (c + 1)·K − 1, the last one fewer), the unit of work: each
finished chunk is written to `OUT.parts/NNNNNN.npz` (a temporary name, then renamed), beside a
`params.json` recording what the pixels depend on. A rerun with the same parameters samples only
the chunks that are missing, dealt to the ranks in turn (missing[rank::world_size]); one with
other parameters is refused. Rank 0 then streams the chunks into the output (never holding the
whole batch, 39 GB for 50k at 512²), checks the counts, renames it into place and removes the
parts folder. The parts folder must be visible to every rank (one machine, or a shared disk).

    job = NpzJob(Path("samples.npz"), num_samples=50_000, chunk_size=250, params={...})
    done = prepare_parts(job, dist)        # refuses an existing output or other parameters
    result = write_npz(model, vae, job, sampling, done, dist, progress=True)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from inference.pipelines import generate, to_uint8
from models.dit import DiT
from models.vae import AutoencoderKL

DEFAULT_CHUNK_SIZE = 250  # 50k samples: 200 chunks of 49 MB at 256², 25 per rank on 8 GPUs
PARAMS_FILE = "params.json"
PARTS_FORMAT = "npz-parts"
TEMP_PREFIX = "tmp-"  # files being written; left by a killed run, removed by the next one
ASSEMBLING = TEMP_PREFIX + "assembling.npz"
CHUNK_NAME = re.compile(r"(\d{6})\.npz")


class NpzError(ValueError):
    """An output or parts folder that this run must not touch; the message says why."""


class Ranks(Protocol):
    """This process's place under torchrun (`training.distributed.DistInfo` is one); the
    process group must be initialised when world_size > 1."""

    rank: int
    world_size: int


def parts_folder(out: Path) -> Path:
    """Where the chunks of `out` are kept until it is assembled: `out` + ".parts"."""
    return out.with_name(out.name + ".parts")


def check_output(out: Path) -> None:
    """Refuse (NpzError) an output that is not a fresh .npz file name: one that exists, does
    not end in .npz, or whose folder cannot be made. Cheap, so callers run it before loading."""
    if out.suffix != ".npz":
        raise NpzError(f"{out}: an ADM sample batch is an .npz file; give a name ending in .npz")
    if out.exists() or out.is_symlink():
        raise NpzError(f"{out}: exists; refusing to overwrite it (choose another --npz)")
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise NpzError(f"{out}: cannot be made, {existing} is a file")


@dataclass(frozen=True)
class NpzJob:
    """Which file to write, how it is cut into chunks, and the parameters recorded with them
    (plain JSON data: what the pixels depend on; a parts folder of other parameters is
    refused)."""

    out: Path
    num_samples: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.chunk_size < 1:
            raise ValueError(f"num_samples ({self.num_samples}) and chunk_size "
                             f"({self.chunk_size}) must be at least 1")

    @property
    def parts(self) -> Path:
        """The parts folder (`parts_folder(out)`)."""
        return parts_folder(self.out)

    @property
    def num_chunks(self) -> int:
        """How many chunks the samples are cut into."""
        return -(-self.num_samples // self.chunk_size)

    def chunk(self, index: int) -> range:
        """The sample indices of chunk `index`."""
        return range(index * self.chunk_size,
                     min((index + 1) * self.chunk_size, self.num_samples))

    def chunk_path(self, index: int) -> Path:
        """The finished file of chunk `index`."""
        return self.parts / f"{index:06d}.npz"

    def recorded(self) -> dict[str, Any]:
        """What params.json holds: the format, the chunking and `params`."""
        return {"format": PARTS_FORMAT, "num_samples": self.num_samples,
                "chunk_size": self.chunk_size, **self.params}


@dataclass(frozen=True)
class Sampling:
    """How every sample is drawn (the arguments of `pipelines.generate`); `labels` (N,) long
    holds sample i's class at i (None: unconditional)."""

    height: int
    width: int
    labels: torch.Tensor | None
    cfg_scale: float = 4.0
    steps: int = 28
    sampler: str = "euler"
    seed: int = 0
    base_tokens: int = 256
    autocast_dtype: torch.dtype | None = None
    batch_size: int = 50  # images per forward pass and per decode, on each rank


@dataclass
class NpzResult:
    """What `write_npz` did (on rank 0 the whole file; `sampled` is this rank's share)."""

    path: Path
    count: int  # samples in the file
    size: tuple[int, int]  # (width, height)
    seconds: float
    resumed: int  # samples kept from an earlier, interrupted run
    sampled: list[int]  # chunks this rank sampled

    @property
    def images_per_s(self) -> float:
        """Samples drawn by this run (all ranks) per second of wall time, assembly included."""
        return (self.count - self.resumed) / self.seconds if self.seconds > 0 else 0.0


# --- the parts folder ------------------------------------------------------------------------
def open_parts(job: NpzJob) -> list[int]:
    """Create the parts folder with its params.json, or check that an existing one was made with
    the same parameters; remove temporary files a killed run left. Returns the finished chunks.
    Raises NpzError for an existing output, a folder of other parameters, or one that is not a
    parts folder. One process only (`prepare_parts` under torchrun)."""
    check_output(job.out)
    recorded = job.recorded()
    params_file = job.parts / PARAMS_FILE
    if job.parts.exists():
        try:
            found = json.loads(params_file.read_text())
        except (OSError, ValueError):
            raise NpzError(f"{job.parts}: exists without a readable {PARAMS_FILE}; not a parts "
                           "folder of inference.py --npz (move it away)") from None
        if found != recorded:
            keys = sorted(set(found) | set(recorded))
            diff = "; ".join(f"{k} {found.get(k)!r} there, {recorded.get(k)!r} here"
                             for k in keys if found.get(k) != recorded.get(k))
            raise NpzError(f"{job.parts}: holds chunks sampled with other parameters ({diff}); "
                           "rerun with those to resume, or remove the folder to start over")
    else:
        job.parts.mkdir(parents=True)
        _write_atomic(params_file, lambda f: f.write(json.dumps(recorded, indent=1).encode()))
    finished = []
    for path in job.parts.iterdir():
        match = CHUNK_NAME.fullmatch(path.name)
        if path.name.startswith(TEMP_PREFIX):
            path.unlink()
        elif match and int(match[1]) < job.num_chunks and path.is_file():
            finished.append(int(match[1]))
    return sorted(finished)


def prepare_parts(job: NpzJob, dist: Ranks | None = None) -> list[int]:
    """`open_parts` on rank 0, its finished chunks on every rank; its refusal is raised on every
    rank, so that none waits for one that has stopped."""
    return _together(dist, lambda: open_parts(job) if dist is None or dist.rank == 0 else None,
                     share=True)


def write_chunk(job: NpzJob, index: int, images: np.ndarray, labels: np.ndarray | None
                ) -> Path:
    """Write chunk `index`: images uint8 (n, H, W, 3) and labels int64 (n,) or None, n its
    sample count; under a temporary name, then renamed, so it is there whole or not at all."""
    expected = len(job.chunk(index))
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != expected:
        raise ValueError(f"chunk {index}: expected uint8 ({expected}, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    path = job.chunk_path(index)
    return _write_atomic(path, lambda f: np.savez(f, **arrays))


def _write_atomic(path: Path, write: Callable) -> Path:
    """Write `path` through `write(file)` into a temporary sibling, flushed, then renamed."""
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    with open(temp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    return path


# --- sampling --------------------------------------------------------------------------------
def sample_chunk(model: DiT, vae: AutoencoderKL, job: NpzJob, index: int, sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunk `index`'s images uint8 (n, H, W, 3) and labels int64 (n,) (None: unconditional),
    drawn `sampling.batch_size` at a time; `on_batch(count)` after each batch. Raises
    ValueError for samples that come out NaN or infinite."""
    rows = job.chunk(index)
    images = []
    for start in range(rows.start, rows.stop, sampling.batch_size):
        batch = range(start, min(start + sampling.batch_size, rows.stop))
        cond = None if sampling.labels is None else sampling.labels[batch.start:batch.stop]
        x = generate(model, vae, sampling.height, sampling.width, num_samples=len(batch),
                     cond=cond, cfg_scale=sampling.cfg_scale, steps=sampling.steps,
                     sampler=sampling.sampler, seed=sampling.seed + batch.start,
                     base_tokens=sampling.base_tokens, autocast_dtype=sampling.autocast_dtype)
        finite = torch.isfinite(x).flatten(1).all(1)  # (b,)
        if not finite.all():
            bad = [batch.start + i for i, ok in enumerate(finite.tolist()) if not ok]
            raise ValueError(f"sample(s) {bad} came out NaN or infinite (in bf16 or fp16 try "
                             "--dtype fp32)")
        images.append(to_uint8(x))  # (b, H, W, 3)
        if on_batch is not None:
            on_batch(len(batch))
    labels = None if sampling.labels is None else sampling.labels[rows.start:rows.stop].numpy()
    return np.concatenate(images), labels


def write_npz(model: DiT, vae: AutoencoderKL, job: NpzJob, sampling: Sampling,
              finished: Iterable[int], dist: Ranks | None = None, progress: bool = False
              ) -> NpzResult:
    """Sample this rank's share of the chunks not in `finished` (from `prepare_parts`), then
    assemble the output on rank 0. A failure on any rank is raised on every rank once the others
    have finished their chunks (what they finished is kept for the rerun). `progress` shows a
    bar on rank 0, its rate scaled by the number of ranks."""
    started = time.perf_counter()
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    done = set(finished)
    missing = [c for c in range(job.num_chunks) if c not in done]
    mine = missing[rank::world]
    resumed = sum(len(job.chunk(c)) for c in done)
    bar = tqdm(total=job.num_samples, initial=resumed, unit="img", dynamic_ncols=True,
               desc=job.out.name, disable=not progress or rank != 0)

    def advance(count: int) -> None:  # an estimate of all ranks: this one's count × ranks
        bar.update(min(count * world, bar.total - bar.n))

    def sample_mine() -> None:
        for index in mine:
            write_chunk(job, index, *sample_chunk(model, vae, job, index, sampling, advance))

    try:
        _together(dist, sample_mine)
    finally:
        bar.close()
    _together(dist, lambda: assemble(job, sampling.labels) if rank == 0 else None)
    return NpzResult(job.out, job.num_samples, (sampling.width, sampling.height),
                     time.perf_counter() - started, resumed, mine)


def _together(dist: Ranks | None, work: Callable[[], Any], share: bool = False) -> Any:
    """Run `work` on every rank; raise the lowest failing rank's error on every rank (named by
    its rank when it is not this one's), else return this rank's result, or rank 0's with
    `share`."""
    result, error = None, None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised
        if dist is None:
            raise
        error = exc
    if dist is None:
        return result
    sent = None if error is None else (str(error), isinstance(error, ValueError))
    everyone = [sent] * dist.world_size
    if dist.world_size > 1:
        torch_dist.all_gather_object(everyone, sent)
    for rank, found in enumerate(everyone):
        if found is None:
            continue
        if rank == dist.rank:
            raise error
        message, bad_input = found
        kind = NpzError if bad_input else RuntimeError
        raise kind(message if rank == 0 else f"rank {rank}: {message}")
    if share and dist.world_size > 1:
        box = [result]
        torch_dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# --- assembly --------------------------------------------------------------------------------
def assemble(job: NpzJob, labels: torch.Tensor | None) -> Path:
    """Stream every chunk into `job.out` (arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,) when
    `labels` (N,) is given), check counts, shapes and labels, rename it into place and remove
    the parts folder. Raises ValueError naming missing or malformed chunks; the output is never
    overwritten and the parts folder stays until the output is in place."""
    missing = [c for c in range(job.num_chunks) if not job.chunk_path(c).is_file()]
    if missing:
        raise ValueError(f"{job.parts}: chunks {missing} are missing; rerun to sample them")
    with np.load(job.chunk_path(0)) as first:
        shape = first["images"].shape[1:]  # (H, W, 3)
    temp = job.parts / ASSEMBLING
    with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        _write_member(archive, "arr_0", (job.num_samples, *shape), np.uint8,
                      (_read_chunk(job, c, shape, labels) for c in range(job.num_chunks)))
        if labels is not None:
            _write_member(archive, "arr_1", (job.num_samples,), np.int64,
                          [labels.numpy().astype(np.int64)])
    _check_written(temp, job.num_samples, shape, labels is not None)
    if job.out.exists():
        raise NpzError(f"{job.out}: appeared while sampling; refusing to overwrite it (the "
                       f"assembled file is {temp})")
    os.replace(temp, job.out)
    shutil.rmtree(job.parts)
    return job.out


def _read_chunk(job: NpzJob, index: int, shape: tuple[int, ...],
                labels: torch.Tensor | None) -> np.ndarray:
    """Chunk `index`'s images (n, H, W, 3), checked against its count, `shape` and `labels`."""
    path, rows = job.chunk_path(index), job.chunk(index)
    with np.load(path) as chunk:
        images = chunk["images"]
        stored = chunk["labels"] if "labels" in chunk else None
    if images.dtype != np.uint8 or images.shape != (len(rows), *shape):
        raise ValueError(f"{path}: expected uint8 {(len(rows), *shape)}, got {images.dtype} "
                         f"{images.shape}")
    expected = None if labels is None else labels[rows.start:rows.stop].numpy()
    if (stored is None) != (expected is None) or (
            stored is not None and not np.array_equal(stored, expected)):
        raise ValueError(f"{path}: its labels are not the ones of samples {rows.start}.."
                         f"{rows.stop - 1}")
    return images


def _write_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: type,
                  parts: Iterable[np.ndarray]) -> None:
    """Write `name`.npy into `archive` from consecutive `parts` of one C-order array, as
    np.savez lays it out, without holding the array whole."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for part in parts:
            member.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


def _check_written(path: Path, count: int, shape: tuple[int, ...], with_labels: bool) -> None:
    """Check the assembled file's members, array headers and sizes (not every byte again)."""
    expected = {"arr_0.npy": ((count, *shape), np.uint8)}
    if with_labels:
        expected["arr_1.npy"] = ((count,), np.int64)
    with zipfile.ZipFile(path) as archive:
        if sorted(archive.namelist()) != sorted(expected):
            raise ValueError(f"{path}: holds {archive.namelist()}, expected {sorted(expected)}")
        for member, (want, dtype) in expected.items():
            with archive.open(member) as f:
                np.lib.format.read_magic(f)
                got, fortran, found = np.lib.format.read_array_header_1_0(f)
                data = archive.getinfo(member).file_size - f.tell()
            size = int(np.prod(want)) * np.dtype(dtype).itemsize
            if got != want or found != dtype or fortran or data != size:
                raise ValueError(f"{path}: {member} holds {found} {got} ({data} bytes), "
                                 f"expected {np.dtype(dtype)} {want} ({size} bytes)")
