"""The start-up benchmark on two tiny folders: it runs end to end and reports sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_startup_reports_every_figure_of_both_sizes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "bench/startup.py", "--sizes", "40", "60", "--runs",
                          "second_start", "--work", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sizes"] == [40, 60] and report["vae"] == "tiny"
    for size in (40, 60):
        run = report["results"][str(size)]["second_start"]
        # 40 or 60 files, of which data.holdout (16) validate: the rest train
        assert run["images"] == size - 16
        assert 0 < run["index_read_bytes"] <= run["cache_read_bytes"] <= run["cache_bytes"] + 4096
        fraction = run["cache_read_bytes"] / run["cache_bytes"]
        assert abs(run["cache_read_fraction"] - fraction) < 1e-3
        assert 0 < run["startup_s"] < run["wall_s"]
        assert {"plan", "latent_cache", "validation", "first_batch"} <= set(run["phases_s"])
        assert run["peak_rss_mb"] >= run["base_rss_mb"] > 0
        assert abs(run["rss_growth_mb"] - (run["peak_rss_mb"] - run["base_rss_mb"])) < 1e-3
        assert run["latent_maps_rss_mb"] > 0  # the first batch was read from mapped shards
        assert run["resident_before_bytes"] == 0  # the cache was dropped from the page cache
    growth = report["growth_per_file"]["second_start"]
    assert set(growth) == {"startup_us_per_file", "wall_us_per_file", "rss_bytes_per_file",
                           "cache_read_bytes_per_file"}
    assert set(report["meets"]) == {"second_start_start_s", "second_start_read_fraction",
                                    "second_start_rss_bytes_per_file"}
    assert (tmp_path / "n60" / "ready.json").is_file()  # prepared once, reused by a rerun
