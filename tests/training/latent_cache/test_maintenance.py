"""Pruning the latent cache, and previewing a prune."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from pathlib import Path


from training.latent_cache.maintenance import (prune_cache, verify_cache)
from training.latent_cache.store import (INDEX_NAME, iter_hex_keys, record_hex_keys)
from tests.training.latent_cache.common import (write_images, tiny_vae, bucketed, build_cache,
                                                index_keys, cache_entries, assert_same_entries,
                                                snapshot, RESOLUTION)


def test_maintenance_prune_removes_unreferenced(tmp_path: Path) -> None:
    root = write_images(tmp_path / "img", 8)
    c = tmp_path / "c"
    build_cache(root, tiny_vae(1), c, shard_size=3)  # another VAE's entries: all unreferenced later
    kept = build_cache(root, tiny_vae(0), c, shard_size=3)
    before = cache_entries(c)
    for name in ("img01.png", "img04.jpg", "img06.jpg"):
        (root / name).unlink()
    now = build_cache(root, tiny_vae(0), c, shard_size=3)
    assert (now.encoded, now.reused) == (0, 6)
    keep = list(iter_hex_keys(now.keys))
    result = prune_cache(c, keep, log=lambda m: None)
    assert result["entries_removed"] == 2 * kept.total - 6  # all of VAE 1's, 3 of VAE 0's
    assert result["shards_removed"] >= 3 and result["bytes_freed"] > 0
    assert index_keys(c) == sorted(keep)
    assert verify_cache(c) == []
    after = cache_entries(c)
    assert_same_entries(after, {k: before[k] for k in keep})
    indexed = {name for (name,) in sqlite3.connect(c / INDEX_NAME).execute(
        "SELECT name FROM shards")}
    assert {p.name for p in (c / "shards").iterdir()} == indexed
    assert build_cache(root, tiny_vae(0), c, shard_size=3).reused == 6


def test_maintenance_prune_dry_run_reports_groups_and_changes_nothing(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 6), tiny_vae()
    c = tmp_path / "c"
    # Two configurations share the folder: 32 px with mirrored crops, and 48 px.
    latent_of = {}
    for resolution, flip in ((RESOLUTION, True), (48, False)):
        built = build_cache(root, vae, c, flip=flip, resolution=resolution, shard_size=3)
        _, buckets, placements = bucketed(root, resolution)
        for i, p in enumerate(placements):
            w, h = (side // vae.downsample_factor for side in buckets[p.bucket])
            latent_of.update({k: (built.fingerprint[:12], f"{w}x{h}")
                              for k in record_hex_keys(built.keys, i)})
        if flip:  # what a 32 px run without --flip uses
            keep = [record_hex_keys(built.keys, i)[0] for i in range(len(built.keys))]
    expected = Counter(latent_of[k] for k in set(index_keys(c)) - set(keep))
    assert len(expected) >= 3 and sum(expected.values()) > len(keep)
    # A shard of kept and removed entries the index lost (a prune re-indexes it first; a dry
    # run counts it but cannot preview it), and a crashed writer's temporary file.
    with contextlib.closing(sqlite3.connect(c / INDEX_NAME)) as conn, conn:
        (mixed,) = next(row for row in conn.execute(
            "SELECT shard FROM entries GROUP BY shard HAVING SUM(key IN (%s)) BETWEEN 1 AND "
            "COUNT(*) - 1" % ",".join("?" * len(keep)), keep))
        lost = {k for (k,) in conn.execute("SELECT key FROM entries WHERE shard = ?", (mixed,))}
        conn.execute("DELETE FROM entries WHERE shard = ?", (mixed,))
        conn.execute("DELETE FROM shards WHERE name = ?", (mixed,))
    (c / "shards" / ".crashed.safetensors.tmp").write_bytes(b"partial")
    previewed = expected - Counter(latent_of[k] for k in lost - set(keep))
    before = snapshot(c)
    logs: list[str] = []
    dry = prune_cache(c, keep, log=logs.append, dry_run=True)
    assert snapshot(c) == before
    assert dry["dry_run"] is True
    assert {(g["fingerprint"], g["latent"]): g["entries"] for g in dry["groups"]} == previewed
    assert [g["entries"] for g in dry["groups"]] == sorted(previewed.values(), reverse=True)
    assert dry["entries_removed"] == sum(previewed.values())
    assert (dry["shards_reindexed"], dry["leftovers_removed"]) == (1, 1)
    assert dry["shards_removed"] > 0 and dry["shards_rewritten"] > 0
    assert sum(g["bytes"] for g in dry["groups"]) == dry["bytes_freed"] > 0
    assert logs[0].startswith(f"dry run, nothing pruned: prune would remove "
                              f"{dry['entries_removed']} entries (")
    assert len(logs) == 2 + len(previewed) and "(not counted above)" in logs[-1]
    for group, line in zip(dry["groups"], logs[1:]):
        assert f"VAE {group['fingerprint']}, latents {group['latent']}: would remove " \
               f"{group['entries']} entr" in line and ", about " in line
    real = prune_cache(c, keep, log=logs.append)
    assert real["dry_run"] is False
    assert {(g["fingerprint"], g["latent"]): g["entries"] for g in real["groups"]} == expected
    assert real["entries_removed"] == sum(expected.values())
    assert real["shards_rewritten"] == dry["shards_rewritten"] + 1  # the re-indexed one
    for field in ("shards_removed", "leftovers_removed", "shards_reindexed"):
        assert real[field] == dry[field], field
    assert index_keys(c) == sorted(keep)
    assert verify_cache(c) == []
