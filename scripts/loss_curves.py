"""Loss curves of several runs side by side, from their TensorBoard files, as JSON.

    UV_CACHE_DIR=.uv-cache uv run python scripts/loss_curves.py runs/a runs/b \\
        [--tags train/loss val/loss train/data_wait_fraction] [--every 50]

For each run and tag: the value at every `--every`-th logged step, as the mean of the logged
values since the previous reported step (training losses are noisy per step), and the mean of
the whole run. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TAGS = ["train/loss", "val/loss", "train/data_wait_fraction", "train/samples_per_s"]


def _events_files(run: Path) -> list[Path]:
    """The TensorBoard events files of a run, oldest name first; FileNotFoundError if none."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    files = sorted((run / "tb").glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run}/tb holds no TensorBoard events file")
    return files


def read_scalars(run: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per tag from every events file under `run`/tb, in step order;
    FileNotFoundError when the run has no events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = _events_files(run)
    values: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in tags:
            if tag in acc.Tags()["scalars"]:
                values[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(v.items()) for tag, v in values.items() if v}


def binned(points: list[tuple[int, float]], every: int) -> list[list[float]]:
    """[step, mean of the values logged in (step - every, step]] for each multiple of every."""
    out, bucket = [], []
    for step, value in points:
        bucket.append(value)
        if step % every == 0 or step == points[-1][0]:
            out.append([step, round(sum(bucket) / len(bucket), 5)])
            bucket = []
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the curves of the runs named on the command line; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with tb/)")
    parser.add_argument("--tags", nargs="+", default=DEFAULT_TAGS, help="scalar tags")
    parser.add_argument("--every", type=int, default=50, help="report every this many steps")
    args = parser.parse_args(argv)
    try:
        if args.every < 1:
            raise ValueError(f"--every {args.every}: must be a positive number of steps")
        for run in args.runs:  # every run checked before any is read
            _events_files(run)
        report = {}
        for run in args.runs:
            curves = read_scalars(run, args.tags)
            report[str(run)] = {tag: {"curve": binned(points, args.every),
                                      "mean": round(sum(v for _, v in points) / len(points), 5)}
                                for tag, points in curves.items()}
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
