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
from pathlib import Path

DEFAULT_TAGS = ["train/loss", "val/loss", "train/data_wait_fraction", "train/samples_per_s"]


def read_scalars(run: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per tag from every events file under `run`/tb, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run / "tb").glob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"error: {run}/tb holds no TensorBoard events file")
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


def main() -> None:
    """Print the curves of the runs named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with tb/)")
    parser.add_argument("--tags", nargs="+", default=DEFAULT_TAGS, help="scalar tags")
    parser.add_argument("--every", type=int, default=50, help="report every this many steps")
    args = parser.parse_args()
    report = {}
    for run in args.runs:
        curves = read_scalars(run, args.tags)
        report[str(run)] = {tag: {"curve": binned(points, args.every),
                                  "mean": round(sum(v for _, v in points) / len(points), 5)}
                            for tag, points in curves.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
