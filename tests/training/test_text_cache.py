"""The text embedding cache on real shard files, with a tiny CLIP and real concurrent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.training.text_encoder_files import StandInEncoder, make_clip_text
from training.text_cache import TMP_PREFIX, TextEmbeddingCache, caption_key
from training.text_encoders import FrozenTextEncoder, load_text_encoder

REPO_ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a cat", "a dog on the beach", "", "the city at night, with bright lights",
            "a cat"]  # a repeat counts once


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    folder = make_clip_text(tmp_path_factory.mktemp("clip") / "clip", projection=True)
    return load_text_encoder(folder, max_length=16)


def _cache_for(root: Path, encoder: FrozenTextEncoder | StandInEncoder) -> TextEmbeddingCache:
    return TextEmbeddingCache(root, encoder.fingerprint, encoder.max_length)


def _shard_keys(folder: Path) -> list[str]:
    keys = []
    for shard in folder.glob("shard-*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            keys += [k for k in handle.keys() if k.endswith(".tokens")]
    return keys


def test_text_cache_encodes_once_then_reuses_and_gets_what_encode_gives(
        clip: FrozenTextEncoder, tmp_path: Path) -> None:
    cache = _cache_for(tmp_path, clip)
    assert cache.folder == tmp_path / f"{clip.fingerprint[:16]}-L16"
    assert cache.missing(CAPTIONS) == CAPTIONS[:4]
    first = cache.ensure(CAPTIONS, clip, batch_size=2)
    assert (first["captions"], first["encoded"], first["reused"]) == (4, 4, 0)
    assert first["seconds"] > 0 and first["captions_per_s"] > 0
    again = _cache_for(tmp_path, clip)  # a new process's view: headers only
    second = again.ensure(CAPTIONS, clip)
    assert (second["encoded"], second["reused"], second["captions_per_s"]) == (0, 4, 0.0)
    assert again.ensure(CAPTIONS, None)["encoded"] == 0  # no encoder needed when all are cached
    got = again.get(CAPTIONS)
    for caption, stored, fresh in zip(CAPTIONS, got, clip.encode(CAPTIONS)):
        assert caption in again
        assert stored.tokens.dtype == torch.float16 and stored.pooled.shape == (16,)
        torch.testing.assert_close(stored.tokens.float(), fresh.tokens.float(), atol=2e-3,
                                   rtol=2e-3)
        torch.testing.assert_close(stored.pooled.float(), fresh.pooled.float(), atol=2e-3,
                                   rtol=2e-3)
    assert got[2].tokens.shape == (2, 32)  # "" is BOS + EOS
    again.close()
    assert len(_shard_keys(cache.folder)) == 4


def test_text_cache_reencodes_only_an_edited_caption_and_keeps_variants_apart(
        tmp_path: Path) -> None:
    encoder = StandInEncoder()
    cache = _cache_for(tmp_path, encoder)
    cache.ensure(CAPTIONS, encoder)
    edited = ["a cat", "a dog on the beach at dawn", "", "the city at night, with bright lights"]
    variants = ["A cat", "a cat ", "a  cat", "a\tcat"]
    assert cache.missing(edited + variants) == ["a dog on the beach at dawn"] + variants
    stats = cache.ensure(edited + variants, encoder)
    assert (stats["encoded"], stats["reused"]) == (5, 3)
    assert sorted(encoder.calls[-1]) == sorted(["a dog on the beach at dawn"] + variants)
    tokens = [e.tokens for e in cache.get(["a cat"] + variants)]
    assert len({t.numpy().tobytes() for t in tokens}) == 5  # five texts, five embeddings
    assert "a dog on the beach" in cache  # the old text is still there, never rewritten


def test_text_cache_other_encoder_or_max_length_never_sees_stale_entries(tmp_path: Path) -> None:
    encoder = StandInEncoder()
    _cache_for(tmp_path, encoder).ensure(CAPTIONS, encoder)
    for other in (StandInEncoder(fingerprint="e" + "f" * 63), StandInEncoder(max_length=9)):
        cache = _cache_for(tmp_path, other)
        assert cache.missing(CAPTIONS) == CAPTIONS[:4] and "a cat" not in cache
        with pytest.raises(ValueError, match="not cached"):
            cache.get(["a cat"])
        with pytest.raises(ValueError, match="is not the one of this cache"):
            cache.ensure(CAPTIONS, encoder)
    assert caption_key("f" * 64, 8, "a cat") != caption_key("f" * 64, 9, "a cat")
    assert len({p.name for p in tmp_path.iterdir()}) == 3


def test_text_cache_refuses_missing_captions_without_encoder(tmp_path: Path) -> None:
    cache = _cache_for(tmp_path, StandInEncoder())
    with pytest.raises(ValueError) as info:
        cache.ensure(CAPTIONS, None)
    assert str(info.value).startswith(f"{cache.folder}: 4 captions are not cached")
    long = "an extremely long caption " * 10
    with pytest.raises(ValueError, match=repr(long[:60])[1:-1]):
        cache.get([long])


def test_text_cache_ignores_and_removes_a_killed_write(tmp_path: Path) -> None:
    encoder = StandInEncoder()
    cache = _cache_for(tmp_path, encoder)
    cache.ensure(CAPTIONS[:2], encoder)
    shard = next(cache.folder.glob("shard-*.safetensors"))
    stray = cache.folder / f"{TMP_PREFIX}killed.safetensors"
    stray.write_bytes(shard.read_bytes()[:100])  # a writer killed half way
    reopened = _cache_for(tmp_path, encoder)
    assert reopened.missing(CAPTIONS) == CAPTIONS[2:4]
    assert reopened.ensure(CAPTIONS, encoder)["encoded"] == 2
    assert not stray.exists() and len(_shard_keys(cache.folder)) == 4


def test_text_cache_sets_aside_a_corrupt_shard_and_reencodes_its_captions(tmp_path: Path) -> None:
    encoder = StandInEncoder()
    cache = _cache_for(tmp_path, encoder)
    cache.ensure(CAPTIONS[:2], encoder)
    cache.ensure(CAPTIONS[2:], encoder)
    good = cache.get(CAPTIONS)
    cache.close()
    shard = sorted(cache.folder.glob("shard-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a damaged disk or copy
    with pytest.warns(UserWarning, match=f"{shard}: unreadable text-embedding shard"):
        reopened = _cache_for(tmp_path, encoder)
    assert not shard.exists()
    assert shard.with_name(shard.name + ".corrupt").read_bytes() == data[: len(data) // 2]
    assert reopened.missing(CAPTIONS) == CAPTIONS[:2]
    assert reopened.ensure(CAPTIONS, encoder)["encoded"] == 2
    for old, new in zip(good, reopened.get(CAPTIONS)):
        assert torch.equal(old.tokens, new.tokens) and torch.equal(old.pooled, new.pooled)


WORKER = """
import json, sys, time
from pathlib import Path
from tests.training.text_encoder_files import StandInEncoder
from training.text_cache import TextEmbeddingCache

root, go, first, last = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
captions = [f"caption number {i}" for i in range(first, last)]
encoder = StandInEncoder(delay=0.05)
cache = TextEmbeddingCache(root, encoder.fingerprint, encoder.max_length)
while not go.exists():
    time.sleep(0.01)
stats = cache.ensure(captions, encoder, batch_size=4)
assert [e.tokens.shape[0] for e in cache.get(captions)] == [3] * len(captions)
print(json.dumps(stats))
"""


def test_text_cache_concurrent_processes_store_each_caption_once(tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(go), first,
                                 last], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for first, last in (("0", "30"), ("10", "40"))]
    time.sleep(0.5)
    go.touch()
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(s["encoded"] for s in stats) == 40
    assert [s["captions"] for s in stats] == [30, 30]
    encoder = StandInEncoder()
    folder = _cache_for(tmp_path, encoder).folder
    keys = _shard_keys(folder)
    assert len(keys) == len(set(keys)) == 40
    assert not list(folder.glob(TMP_PREFIX + "*"))
