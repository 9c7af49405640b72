"""The latent cache folder: entry keys and crash-safe removal of shards."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from training.latent_cache import store
from training.latent_cache.maintenance import (prune_cache, verify_cache)
from training.latent_cache.shards import read_header
from training.latent_cache.store import (INDEX_NAME, Store, entry_key, iter_hex_keys)
from tests.training.latent_cache.common import (write_images, tiny_vae, build_cache, index_keys,
                                                shard_rows, Killed)


def test_store_keys_change_with_the_key_version(monkeypatch) -> None:
    # Entries encoded by an older pixel pipeline must not be read as current ones.
    args = ("ab" * 32, (32, 32), (40, 32), (4, 0, 36, 32), False, "f" * 64)
    key = entry_key(*args)
    assert key == entry_key(*args) and len(key) == 64
    monkeypatch.setattr(store, "KEY_VERSION", store.KEY_VERSION - 1)
    assert entry_key(*args) != key


def test_store_removal_is_crash_safe(tmp_path: Path, monkeypatch) -> None:
    root = write_images(tmp_path / "img", 8)
    c = tmp_path / "c"
    build_cache(root, tiny_vae(1), c, shard_size=3)  # another VAE's entries: pruned below
    kept = build_cache(root, tiny_vae(0), c, shard_size=3)
    # A build dropping damaged shards, killed after the tombstone (x) or after unlinking (y):
    # neither comes back, and their entries are re-encoded.
    rows = shard_rows(c)
    x, y = sorted(n for n in rows if n.startswith(kept.fingerprint[:12]))[:2]
    store = Store(c)
    with contextlib.closing(store.connect()) as conn:
        store.tombstone(conn, {x: "test", y: "test"})
    (c / "shards" / y).unlink()
    again = build_cache(root, tiny_vae(0), c, shard_size=3)
    assert (again.encoded, again.reused) == (rows[x] + rows[y], kept.total - rows[x] - rows[y])
    assert not (c / "shards" / x).exists() and x not in shard_rows(c)
    # A prune killed after tombstoning the shards it empties (first removal), or the first
    # shard it rewrote (second removal: the first prune was killed before any rewrite): the
    # files still hold pruned entries, yet a later tidy never lists them again.
    for name in ("img01.png", "img04.jpg", "img06.jpg"):
        (root / name).unlink()
    now = build_cache(root, tiny_vae(0), c, shard_size=3)
    keep = list(iter_hex_keys(now.keys))
    real = Store.remove_dropped
    for kill_at in (1, 2):
        calls = []

        def remove_dropped(self, conn, names=None, kill_at=kill_at, calls=calls):
            if names is not None:  # not tidy's clean-up of earlier tombstones
                calls.append(names)
                if len(calls) == kill_at:
                    raise Killed
            return real(self, conn, names)

        monkeypatch.setattr(Store, "remove_dropped", remove_dropped)
        with pytest.raises(Killed):
            prune_cache(c, keep, log=lambda m: None)
        monkeypatch.setattr(Store, "remove_dropped", real)
        assert calls[-1], kill_at  # shards were tombstoned, their files still there
        assert all((c / "shards" / n).exists() for n in calls[-1])
        assert set(index_keys(c)) >= set(keep)
        logs: list[str] = []
        rebuilt = build_cache(root, tiny_vae(0), c, shard_size=3, logs=logs)  # its tidy finishes up
        assert (rebuilt.reused, rebuilt.encoded) == (now.total, 0)
        assert any(f"deleted {len(calls[-1])} shard file(s) dropped earlier" in m
                   for m in logs), logs
        assert not set(index_keys(c)) - set(keep)  # nothing pruned came back
        indexed = set(shard_rows(c))
        assert {p.name for p in (c / "shards").iterdir()} == indexed
    assert index_keys(c) == sorted(keep)
    assert verify_cache(c) == []


def test_store_shards_hold_their_keys_as_a_tensor(tmp_path: Path) -> None:
    # A shard's header holds no key list, so it stays a few hundred bytes however many rows:
    # a build stamps every shard it reuses by its header. Its keys are a (rows, 32) tensor.
    root, c = write_images(tmp_path / "img", 6), tmp_path / "c"
    build_cache(root, tiny_vae(), c, flip=True, shard_size=5)
    with contextlib.closing(sqlite3.connect(c / INDEX_NAME)) as conn:
        for name, rows in shard_rows(c).items():
            path = c / "shards" / name
            start, header = read_header(path)
            assert header["__metadata__"]["version"] == "2" and start < 512
            assert "keys" not in header["__metadata__"]
            assert (header["keys"]["dtype"], header["keys"]["shape"]) == ("U8", [rows, 32])
            keys = load_file(path)["keys"]
            listed = dict(conn.execute("SELECT row, key FROM entries WHERE shard = ?", (name,)))
            assert listed == {r: bytes(keys[r]).hex() for r in range(rows)}
