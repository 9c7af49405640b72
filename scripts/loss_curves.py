"""Loss curves of several runs side by side, from their TensorBoard files, as JSON.

    UV_CACHE_DIR=.uv-cache uv run python scripts/loss_curves.py runs/a runs/b \\
        [--tags loss/train loss/val speed/data_wait_fraction] [--every 50]

For each run and tag: the mean of the values logged in each interval (k·every − every, k·every]
that holds a logged step, reported at k·every (the last one at the run's last logged step;
training losses are noisy per step), and the mean of the whole run. A resumed run's abandoned
branch is left out (`run_scalars`). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_TAGS = ["loss/train", "loss/val", "speed/data_wait_fraction", "speed/samples_per_s"]


def _events_files(run: Path) -> list[Path]:
    """The TensorBoard events files of a run, in name order; FileNotFoundError if none."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    files = sorted((run / "tb").glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run}/tb holds no TensorBoard events file")
    return files


class Scalar(NamedTuple):
    """One logged value. `process` numbers the training processes that logged the run (one
    events file each) in the order they ran, from 0."""

    wall_time: float
    step: int
    value: float
    process: int


def run_scalars(files: list[Path]) -> dict[str, list[Scalar]]:
    """Every scalar in a run's TensorBoard `files`: {tag: [Scalar, ...] in step order}, with
    the steps a resume abandoned left out.

    Each process that trains a run adds an events file to its tb/. When a newer file starts at
    step s (its first logged step), the run was resumed from a checkpoint before s, so what the
    older files logged from step s on belongs to the branch that resume abandoned and is
    dropped. Files are ordered by the wall time of their first event, written when the file is
    created. (Their names are no reliable order: they hold that time in whole seconds, then the
    host, the process id and a per-process counter, the last two not zero-padded.) A file
    without events holds nothing and is passed over. Tags older runs logged under other names
    come under today's (`training.logging.RENAMED_TAGS`).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.logging import RENAMED_TAGS

    loaded = []
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
        acc.Reload()
        try:
            created = acc.FirstEventTimestamp()
        except ValueError:  # no event at all
            continue
        loaded.append((created, path.name, {RENAMED_TAGS.get(tag, tag): acc.Scalars(tag)
                                            for tag in acc.Tags()["scalars"]}))
    kept: dict[str, list[Scalar]] = {}
    cut = math.inf  # the first step of the newer files: older files count below it
    in_order = sorted(loaded, key=lambda f: f[:2])
    for process in reversed(range(len(in_order))):  # newest first
        scalars = in_order[process][2]
        for tag, events in scalars.items():
            kept.setdefault(tag, []).extend(Scalar(e.wall_time, e.step, e.value, process)
                                            for e in events if e.step < cut)
        cut = min([cut, *(e.step for events in scalars.values() for e in events)])
    return {tag: sorted(events, key=lambda e: e.step) for tag, events in kept.items() if events}


def read_scalars(run: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per tag (those of `tags` the run logged) from the events files under
    `run`/tb, in step order, without a resume's abandoned branch (`run_scalars`);
    FileNotFoundError when the run has no events file."""
    scalars = run_scalars(_events_files(run))
    return {tag: [(e.step, e.value) for e in scalars[tag]] for tag in tags if tag in scalars}


def binned(points: list[tuple[int, float]], every: int) -> list[list[float]]:
    """[end, mean of the values logged in (end - every, end]] for each `end`, a multiple of
    `every`, whose interval holds one of the (step, value) `points` (in step order); the last
    interval, when the run stopped inside it, is reported at the last logged step."""
    bins: dict[int, list[float]] = {}
    for step, value in points:
        bins.setdefault(-(-step // every) * every, []).append(value)  # ceil(step / every) * every
    last = points[-1][0]
    return [[min(end, last), round(sum(values) / len(values), 5)] for end, values in bins.items()]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the curves of the runs named on the command line; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with tb/)")
    parser.add_argument("--tags", nargs="+", default=DEFAULT_TAGS, help="scalar tags")
    parser.add_argument("--every", type=int, default=50,
                        help="report the mean of each interval of this many steps")
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
