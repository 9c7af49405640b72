"""An append-only disk cache of caption embeddings from a frozen text encoder (issue 20).

One folder per encoder and max_length: `root / f"{fingerprint[:16]}-L{max_length}"`. An entry's
key is the sha256 hex of (fingerprint, max_length, exact caption text), so an edited caption is
a new entry, another encoder or max_length never finds a stale one, and prompt variants that
differ only in case or whitespace stay apart.

Layout of the folder:

- `shard-<time>-<pid>-<random>.safetensors`: float16 tensors `<key>.tokens` (L, D) with the
  valid tokens only (L may be 0: safetensors stores zero-size tensors) and `<key>.pooled` (P,)
  when the encoder has a pooled output. A shard is written under a hidden temporary name
  (`.tmp-shard-...`), synced and renamed into place, and never rewritten or deleted afterwards.
- `.lock`: `fcntl.flock`ed while a process encodes and writes, so that concurrent ranks never
  encode a caption twice; temporary shards found while holding it are leftovers of a killed
  writer and are removed.
- `*.corrupt`: a shard whose header does not read, renamed aside (never deleted) and reported;
  its captions are encoded again into a new shard.

Opening the cache reads only the shard headers; `get` reads tensors through kept-open
`safe_open` handles, so memory stays small however large the cache grows.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from training.text_encoders import FrozenTextEncoder, TextEmbedding

SHARD_CAPTIONS = 2048  # captions per shard, held in memory until written; a kill loses these
TMP_PREFIX = ".tmp-shard-"


def caption_key(fingerprint: str, max_length: int, caption: str) -> str:
    """The cache key of a caption: sha256 hex of the encoder, max_length and the exact text."""
    text = f"{fingerprint}\n{max_length}\n{caption}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class TextEmbeddingCache:
    """Caption embeddings of one encoder (fingerprint) and max_length, stored under `root`."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, max_length: int) -> None:
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.folder = Path(root) / f"{fingerprint[:16]}-L{max_length}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[str, bool]] = {}  # key -> (shard name, has pooled)
        self._seen: set[str] = set()  # shard names whose headers were read
        self._handles: dict[str, Any] = {}  # shard name -> open safe_open handle
        self._refresh()

    def _key(self, caption: str) -> str:
        return caption_key(self.fingerprint, self.max_length, caption)

    def _refresh(self) -> None:
        """Index the shards written since the last look (headers only)."""
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self._seen:
                continue
            try:
                with safe_open(path, framework="pt") as handle:
                    names = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error type for bad headers
                _set_aside(path, exc)
                continue
            self._seen.add(path.name)
            for name in names:
                key, _, part = name.partition(".")
                if part == "tokens":
                    self._index[key] = (path.name, f"{key}.pooled" in names)

    def _indexed(self, key: str) -> bool:
        if key not in self._index:
            self._refresh()  # another process may have written it since
        return key in self._index

    def __contains__(self, caption: str) -> bool:
        """Whether the caption is cached (written by this or any other process)."""
        return self._indexed(self._key(caption))

    def __len__(self) -> int:
        """The number of cached captions."""
        return len(self._index)

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions not cached yet, in first-seen order."""
        self._refresh()
        return [c for c in dict.fromkeys(captions) if self._key(c) not in self._index]

    def ensure(self, captions: Iterable[str], encoder: FrozenTextEncoder | None,
               batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
        """Encode and store the captions not cached yet; safe to call from several processes.

        `encoder` may be None when every caption is cached. Returns {"captions" (distinct),
        "reused", "encoded", "seconds", "captions_per_s" (encoded per second of this call)}.
        """
        start = time.perf_counter()
        distinct = list(dict.fromkeys(captions))
        todo = self.missing(distinct)
        if todo and encoder is None:
            raise ValueError(f"{self.folder}: {len(todo)} captions are not cached and no text "
                             "encoder was given to encode them")
        encoded = 0
        if todo:
            self._check_encoder(encoder)
            with self._locked():
                todo = self.missing(todo)  # others may have written some while we waited
                encoded = self._encode(todo, encoder, batch_size, progress)
        seconds = time.perf_counter() - start
        return {"captions": len(distinct), "reused": len(distinct) - encoded, "encoded": encoded,
                "seconds": seconds, "captions_per_s": encoded / seconds if encoded else 0.0}

    def _check_encoder(self, encoder: FrozenTextEncoder) -> None:
        if (encoder.fingerprint, encoder.max_length) != (self.fingerprint, self.max_length):
            raise ValueError(
                f"{self.folder}: the encoder (fingerprint {encoder.fingerprint[:16]}, max_length "
                f"{encoder.max_length}) is not the one of this cache; expected fingerprint "
                f"{self.fingerprint[:16]} and max_length {self.max_length}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock; clear temporary shards of killed writers."""
        with open(self.folder / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                for stray in self.folder.glob(TMP_PREFIX + "*"):
                    stray.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _encode(self, todo: list[str], encoder: FrozenTextEncoder, batch_size: int,
                progress: bool) -> int:
        """Encode `todo` longest first (less padding), one shard per SHARD_CAPTIONS captions."""
        from tqdm import tqdm

        todo = sorted(todo, key=len, reverse=True)
        bar = tqdm(total=len(todo), desc="text embeddings", unit="caption", disable=not progress)
        with bar:
            for first in range(0, len(todo), SHARD_CAPTIONS):
                chunk = todo[first:first + SHARD_CAPTIONS]
                tensors = {}
                for low in range(0, len(chunk), batch_size):
                    texts = chunk[low:low + batch_size]
                    for text, emb in zip(texts, encoder.encode(texts, batch_size=batch_size)):
                        key = self._key(text)
                        # own copies: safetensors refuses tensors that share memory
                        tensors[f"{key}.tokens"] = emb.tokens.half().clone()  # (L, D)
                        if emb.pooled is not None:
                            tensors[f"{key}.pooled"] = emb.pooled.half().clone()  # (P,)
                    bar.update(len(texts))
                self._write_shard(tensors)
        return len(todo)

    def _write_shard(self, tensors: dict) -> None:
        """Write a new shard atomically (temporary name, fsync, rename) and index it."""
        unique = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.folder / f"{TMP_PREFIX}{unique}.safetensors"
        final = self.folder / f"shard-{unique}.safetensors"
        save_file(tensors, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
        self._refresh()

    def get(self, captions: Sequence[str]) -> list[TextEmbedding]:
        """The cached embeddings of `captions`, in order; ValueError naming an uncached one.

        The tensors are copies, independent of the shard files.
        """
        out = []
        for caption in captions:
            key = self._key(caption)
            if not self._indexed(key):
                raise ValueError(f"{self.folder}: caption {caption[:60]!r} is not cached; "
                                 "expected ensure() to have encoded it")
            shard, has_pooled = self._index[key]
            handle = self._handle(shard)
            # copies: get_tensor's results alias the shard's memory map
            tokens = handle.get_tensor(f"{key}.tokens").clone()  # (L, D)
            pooled = handle.get_tensor(f"{key}.pooled").clone() if has_pooled else None  # (P,)
            out.append(TextEmbedding(tokens, pooled))
        return out

    def _handle(self, shard: str) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        return self._handles[shard]

    def close(self) -> None:
        """Drop the open shard handles (the cache can still be used; they reopen lazily)."""
        self._handles.clear()

    def __enter__(self) -> TextEmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_aside(path: Path, exc: Exception) -> None:
    """Rename an unreadable shard to `*.corrupt` (never delete it) and report it."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    target = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process set it aside first
        return
    warnings.warn(f"{path}: unreadable text-embedding shard ({reason}); renamed to "
                  f"{target.name}, its captions will be encoded again", stacklevel=4)
