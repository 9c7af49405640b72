"""Captions of the images of a data set, for text-to-image training.

Two sources, either or both in one folder:

- a sidecar text file beside an image, the same path with the image's extension replaced by
  `.txt` (`a/b.png` -> `a/b.txt`, the kohya / SimpleTuner convention): each non-blank line,
  stripped, is one caption of the image;
- a `metadata.jsonl` at the data set's root (the Hugging Face imagefolder convention): one JSON
  object a line with `file_name` (relative to the root, POSIX separators) and `text` or
  `caption`, a string or a list of strings (several captions).

A sidecar with a caption wins over the image's `metadata.jsonl` entry (a blank sidecar does
not count); entries naming files that are not in the table (skipped or held-out images) are
left out. Images without any caption train with the empty caption "". Each folder holding
images is listed once, so a set of 200k images costs one open per sidecar, not one failed open
per image without one. Captions are read afresh on every call: an edited caption takes effect
on the next run.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.image_table import ImageTable

METADATA_FILE = "metadata.jsonl"
SIDECAR_SUFFIX = ".txt"
# Where an image's captions came from (`Captions.sources`):
FROM_TXT = "txt"
FROM_METADATA = "metadata"
FROM_TXT_OVER_METADATA = "txt over metadata"  # both had captions; the sidecar won
FROM_NOWHERE = ""


class CaptionError(ValueError):
    """A caption file that cannot be used: one line naming the file (and line) and what was
    expected."""


@dataclass
class Captions:
    """Captions of the images of an ImageTable, row for row.

    `options[i]` holds row i's captions (several lines of a sidecar are several captions), ()
    when it has none. `sources[i]` says where they came from (FROM_TXT, FROM_METADATA,
    FROM_TXT_OVER_METADATA or FROM_NOWHERE); left empty, it is filled in as unknown ("given").
    `unmatched` counts the `metadata.jsonl` entries that named no image of the table read.
    """

    options: list[tuple[str, ...]]
    sources: list[str] = field(default_factory=list)
    unmatched: int = 0

    def __post_init__(self) -> None:
        self.options = [tuple(o) for o in self.options]
        if not self.sources:
            self.sources = ["given" if o else FROM_NOWHERE for o in self.options]
        if len(self.sources) != len(self.options):
            raise ValueError(f"captions: {len(self.sources)} sources for "
                             f"{len(self.options)} images")

    def __len__(self) -> int:
        return len(self.options)

    @property
    def missing(self) -> int:
        """Images without any caption (they train with the empty caption "")."""
        return sum(1 for o in self.options if not o)

    def take(self, rows: Sequence[int] | np.ndarray) -> Captions:
        """The captions of rows `rows` (in that order), as `ImageTable.take` cuts a table."""
        n = len(self)
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"rows {idx.min()}..{idx.max()} of the captions of {n} image(s)")
        idx = idx.tolist()
        return Captions([self.options[i] for i in idx], [self.sources[i] for i in idx],
                        self.unmatched)

    def pick(self, rows: Sequence[int], seeds: Sequence[int]) -> list[str]:
        """One caption per row of `rows`: `options[seed % len(options)]` with the row's seed
        (deterministic), "" for an image without captions."""
        if len(rows) != len(seeds):
            raise ValueError(f"captions: {len(rows)} rows for {len(seeds)} seeds")
        out = []
        for row, seed in zip(rows, seeds):
            options = self.options[int(row)]
            out.append(options[int(seed) % len(options)] if options else "")
        return out

    def distinct(self) -> list[str]:
        """Every distinct caption, and "" always, sorted: the strings to embed once."""
        return sorted({c for options in self.options for c in options} | {""})

    def summary(self) -> str:
        """One line for people: how many images have captions, from where, and how many
        train with the empty caption."""
        counts = Counter(self.sources)
        n, missing = len(self), self.missing
        txt = counts[FROM_TXT] + counts[FROM_TXT_OVER_METADATA]
        parts = [f"{txt} from .txt", f"{counts[FROM_METADATA]} from {METADATA_FILE}"]
        if counts["given"]:
            parts.append(f"{counts['given']} given")
        text = (f"captions: {n} images, {n - missing} captioned ({', '.join(parts)}), "
                f"{missing} without (trained with the empty caption)")
        if counts[FROM_TXT_OVER_METADATA]:
            text += (f"; .txt won over {METADATA_FILE} for {counts[FROM_TXT_OVER_METADATA]} "
                     "image(s)")
        if self.unmatched:
            text += (f"; {self.unmatched} {METADATA_FILE} entries name no image of the table "
                     "(skipped or held out)")
        return text


def _split_lines(text: str) -> tuple[str, ...]:
    """The non-blank lines of `text`, stripped."""
    return tuple(s for s in (line.strip() for line in text.splitlines()) if s)


def _read_sidecar(path: str) -> tuple[str, ...]:
    """The captions of one sidecar file: its non-blank lines, stripped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CaptionError(f"{path}: cannot read the caption file: {exc.strerror or exc}"
                           ) from None
    try:
        return _split_lines(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path}: not UTF-8 (byte {exc.start}); expected captions as "
                           "UTF-8 text, one a line") from None


def _sidecar_names(folder: str) -> set[str]:
    """The names of the sidecar (`.txt`) entries in `folder` that are not folders, from one
    listing (a broken link among them is reported when read)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries
                    if e.name.endswith(SIDECAR_SUFFIX) and not e.is_dir()}
    except OSError as exc:
        raise CaptionError(f"{folder}: cannot list the folder for caption files: "
                           f"{exc.strerror or exc}") from None


def _caption_value(value: object) -> tuple[str, ...] | None:
    """The captions a `text` or `caption` value holds; None when it is neither a string nor a
    list of strings."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(s for s in (v.strip() for v in value) if s)


def _metadata_record(line: str, where: str) -> tuple[str, tuple[str, ...]]:
    """(file_name, captions) of one `metadata.jsonl` line; `where` is its file:line."""
    try:
        record = json.loads(line)
    except ValueError:
        raise CaptionError(f"{where}: not JSON; expected one JSON object a line") from None
    if not isinstance(record, dict):
        raise CaptionError(f"{where}: expected a JSON object, not {type(record).__name__}")
    name = record.get("file_name")
    if not isinstance(name, str) or not name:
        raise CaptionError(f"{where}: no file_name; expected a path relative to the folder")
    key = "text" if record.get("text") is not None else "caption"
    if record.get(key) is None:
        raise CaptionError(f"{where}: {name} has neither text nor caption")
    captions = _caption_value(record[key])
    if captions is None:
        raise CaptionError(f"{where}: {key} of {name} is a {type(record[key]).__name__}; "
                           "expected a string or a list of strings")
    return posixpath.normpath(name), captions


def read_metadata(path: str) -> dict[str, tuple[int, tuple[str, ...]]]:
    """The entries of a `metadata.jsonl`: normalised file_name -> (line number, captions); {}
    without the file. Raises CaptionError naming the file and line of a bad entry."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CaptionError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CaptionError(f"{path}:{line}: not UTF-8; expected JSON lines") from None
    out: dict[str, tuple[int, tuple[str, ...]]] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        name, captions = _metadata_record(line, where)
        if name in out:
            raise CaptionError(f"{where}: {name} again (first at line {out[name][0]}); "
                               "expected one line a file")
        out[name] = (number, captions)
    return out


def read_captions(table: ImageTable, root: str | os.PathLike) -> Captions:
    """The captions of every row of `table`, whose relative paths are under `root`: from
    sidecar `.txt` files and the root's `metadata.jsonl` (see the module docstring). Raises
    CaptionError (one line naming the file) for a caption file that cannot be used."""
    root = os.fspath(root)
    n = len(table)
    # every row's relative path (POSIX), from one pass over the table's columns
    rels = os.fsdecode(b"".join(table.rel_lines([b"\0"]))).split("\0")[:n]
    metadata = read_metadata(os.path.join(root, METADATA_FILE))
    listed: dict[str, set[str]] = {}  # folder (relative) -> its sidecar names
    options: list[tuple[str, ...]] = []
    sources: list[str] = []
    matched = set()
    for rel in rels:
        folder, name = posixpath.split(rel)
        sidecars = listed.get(folder)
        if sidecars is None:
            sidecars = listed[folder] = _sidecar_names(os.path.join(root, folder))
        stem = posixpath.splitext(name)[0] + SIDECAR_SUFFIX
        from_txt = _read_sidecar(os.path.join(root, folder, stem)) if stem in sidecars else ()
        entry = metadata.get(rel)
        from_meta = entry[1] if entry else ()
        if entry:
            matched.add(rel)
        if from_txt:
            options.append(from_txt)
            sources.append(FROM_TXT_OVER_METADATA if from_meta else FROM_TXT)
        else:
            options.append(from_meta)
            sources.append(FROM_METADATA if from_meta else FROM_NOWHERE)
    return Captions(options, sources, len(metadata) - len(matched))
