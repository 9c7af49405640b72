"""Locating a run's entries: keys computed in chunks, and the index's manifest of a key list."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from training.latent_cache.locate import MANIFESTS_KEPT, EntryKeys, generation
from training.latent_cache.maintenance import prune_cache, verify_cache
from training.latent_cache.read import LatentReader
from training.latent_cache.shards import read_header
from training.latent_cache.store import INDEX_NAME, entry_key, iter_hex_keys
from tests.training.latent_cache.common import (assert_same_entries, bucketed, build_cache,
                                                cache_entries, tiny_vae, write_images)


def _index(cache_dir: Path) -> contextlib.closing:
    return contextlib.closing(sqlite3.connect(cache_dir / INDEX_NAME, isolation_level=None))


def test_locate_keys_are_the_entry_keys_in_any_chunks(tmp_path: Path) -> None:
    root = write_images(tmp_path / "img", 5)
    scan, buckets, placements = bucketed(root)
    keys = EntryKeys.for_records(scan.records, placements, buckets, "f" * 64, flip=True)
    expected = [[entry_key(rec.sha256, tuple(buckets[p.bucket]), p.resized, p.crop, flip,
                           "f" * 64) for flip in (False, True)]
                for rec, p in zip(scan.records, placements)]
    whole = keys.array()  # (N, 2, 32)
    assert [[bytes(k).hex() for k in row] for row in whole] == expected
    assert np.array_equal(np.concatenate([part for _, part in keys.chunks(2)]), whole)
    assert np.array_equal(keys.rows([4, 0]), whole[[4, 0]])
    assert keys.digest() == EntryKeys.from_array(whole).digest()
    assert keys.digest() != EntryKeys.from_array(whole[:, :1].copy()).digest()


def test_locate_manifest_serves_unchanged_starts_until_the_index_changes(tmp_path: Path) -> None:
    root, vae, c = write_images(tmp_path / "img", 6), tiny_vae(), tmp_path / "c"
    first = build_cache(root, vae, c, flip=True, shard_size=4)
    assert not first.from_manifest and not first.locations.missing().any()
    again = build_cache(root, vae, c, flip=True, shard_size=4)
    assert again.from_manifest and again.reused == first.total
    assert np.array_equal(again.locations.where, first.locations.where)
    assert again.locations.names == first.locations.names
    # Another key list has its own manifest; neither replaces the other.
    plain = build_cache(root, vae, c, shard_size=4)
    assert not plain.from_manifest and plain.reused == 7
    assert build_cache(root, vae, c, flip=True, shard_size=4).from_manifest
    assert build_cache(root, vae, c, shard_size=4).from_manifest
    # Any row written to or deleted from `entries` or `shards`, by any code, retires them.
    with _index(c) as conn:
        before = generation(conn)
        conn.execute("INSERT INTO checks (shard, stamp, sums_bytes, row_sums) "
                     "VALUES ('x', 'stamp', 1, x'00')")  # not a location
        assert generation(conn) == before
        conn.execute("UPDATE shards SET created = 0 WHERE name = ?", (first.locations.names[0],))
        assert generation(conn) == before + 1
    changed = build_cache(root, vae, c, flip=True, shard_size=4)
    assert not changed.from_manifest and changed.reused == first.total
    assert build_cache(root, vae, c, flip=True, shard_size=4).from_manifest
    build_cache(root, tiny_vae(1), c, shard_size=4)  # another VAE's entries: new shards
    assert not build_cache(root, vae, c, flip=True, shard_size=4).from_manifest
    # A prune deletes and rewrites shards: the locations move, and are looked up again.
    keep = list(iter_hex_keys(plain.keys))
    before = cache_entries(c)
    prune_cache(c, keep, log=lambda m: None)
    pruned = build_cache(root, vae, c, shard_size=4)
    assert not pruned.from_manifest and pruned.reused == 7
    assert_same_entries(cache_entries(c), {k: before[k] for k in keep})
    with _index(c) as conn:
        assert conn.execute("SELECT COUNT(*) FROM manifests").fetchone()[0] <= MANIFESTS_KEPT
        stale = conn.execute("SELECT COUNT(*) FROM manifests WHERE generation != ?",
                             (generation(conn),)).fetchone()[0]
        assert stale == 0


def test_locate_reader_refuses_locations_whose_shard_was_pruned(tmp_path: Path) -> None:
    root, vae, c = write_images(tmp_path / "img", 4), tiny_vae(), tmp_path / "c"
    built = build_cache(root, vae, c, flip=True, shard_size=4)
    prune_cache(c, [], log=lambda m: None)
    with pytest.raises(KeyError, match="no longer in the cache"):
        LatentReader(c, built.locations)
    with pytest.raises(KeyError, match="10 of 10 entries are missing"):
        LatentReader(c, built.keys)


def _downgrade(cache_dir: Path) -> None:
    """Make a cache folder as code before the manifest wrote it: shards listing their keys in
    their metadata (version 1), an index of format 1 without manifests or generation, and no
    stamps (as before stamps, so every shard is read in full once)."""
    with _index(cache_dir) as conn:
        for (name,) in conn.execute("SELECT name FROM shards").fetchall():
            path = cache_dir / "shards" / name
            meta = read_header(path)[1]["__metadata__"]
            tensors = load_file(path)
            keys = [bytes(k).hex() for k in tensors.pop("keys")]
            save_file(tensors, path, metadata={**meta, "version": "1", "keys": json.dumps(keys)})
            conn.execute("UPDATE shards SET bytes = ?, sha256 = ? WHERE name = ?",
                         (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                          name))
        conn.execute("DROP TABLE checks")
        conn.execute("CREATE TABLE checks (shard TEXT PRIMARY KEY, stamp TEXT NOT NULL, "
                     "row_sums BLOB NOT NULL) WITHOUT ROWID")
        for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                                       ).fetchall():
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE manifests")
        conn.execute("DELETE FROM meta WHERE name = 'generation'")
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'format'")


def test_locate_cache_of_format_1_is_upgraded_in_place_without_encoding(tmp_path: Path) -> None:
    root, vae, c = write_images(tmp_path / "img", 6), tiny_vae(), tmp_path / "c"
    built = build_cache(root, vae, c, flip=True, shard_size=4)
    entries = cache_entries(c)
    _downgrade(c)
    upgraded = build_cache(root, vae, c, flip=True, shard_size=4)
    assert (upgraded.reused, upgraded.encoded) == (built.total, 0)
    assert upgraded.shards_checked_fully == built.shards
    with _index(c) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone() == ("2",)
    assert build_cache(root, vae, c, flip=True, shard_size=4).from_manifest
    assert verify_cache(c) == []
    assert_same_entries(cache_entries(c), entries)
    # Version 1 shards are re-indexed from their metadata when the index is lost, and live on
    # beside version 2 shards.
    (c / INDEX_NAME).unlink()
    (root / "img00.jpg").unlink()
    more = write_images(tmp_path / "more", 2, seed=5)
    for path in more.iterdir():
        path.rename(root / f"new_{path.name}")
    logs: list[str] = []
    mixed = build_cache(root, vae, c, flip=True, shard_size=4, logs=logs)
    assert any(f"re-indexed {built.shards} whole shard(s)" in m for m in logs)
    assert mixed.encoded == 6 and mixed.reused == built.total - 2
    assert verify_cache(c) == []
