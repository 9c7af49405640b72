"""Collect real photographs into a train / held-out folder pair for VAE training.

    python scripts/prepare_photos.py --source /usr/share/wallpapers --source DIR ... --out DIR

Every raster image under each source is loaded with the repo's robust loader, downscaled so its
longer side is at most `--max-side` (never upscaled) and saved as PNG. Wallpaper folders hold one
picture at several sizes named like 1920x1080.jpg: only the largest of those is kept. Files are
sorted by name and every `--holdout-every`-th (or those matching `--heldout`) goes to `heldout/`,
the rest to `train/`. An output is named after the last four parts of its input's path; inputs
that would share a name (a/x.jpg and a/x.png) keep their suffix in it, so none overwrites another.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from training.images import ImageLoadError, load_image
from training.scan import IMAGE_EXTENSIONS

SIZE_NAME = re.compile(r"^(\d+)x(\d+)$")


def collect(sources: list[Path]) -> list[Path]:
    """Image files under the sources, one per wallpaper folder of sized copies."""
    found: list[Path] = []
    for source in sources:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and p.is_file() and "screenshot" not in p.name.lower())
        by_folder: dict[Path, list[Path]] = {}
        for f in files:
            by_folder.setdefault(f.parent, []).append(f)
        for folder, members in sorted(by_folder.items()):
            sized = [m for m in members if SIZE_NAME.match(m.stem)]
            if sized:
                members = [max(sized, key=lambda m: int(SIZE_NAME.match(m.stem)[1]))]
            found += members
    return found


def output_names(files: list[Path]) -> dict[Path, str]:
    """A distinct PNG file name per input file: its last four path parts joined by "_", without
    the suffix. Inputs that would share a name (a/x.jpg and a/x.png) keep their suffix in it
    (a_x_jpg.png, a_x_png.png); such a name that another input has already (a/x_png.png) gets a
    counter. Names differ in more than case, for case-insensitive file systems."""
    stems = {f: Path("_".join(f.parts[-4:]).replace(" ", "_")).stem for f in files}
    shared = Counter(stem.lower() for stem in stems.values())
    names = {f: stem for f, stem in stems.items() if shared[stem.lower()] == 1}
    taken = {name.lower() for name in names.values()}
    for f in files:
        if f not in names:
            name = candidate = f"{stems[f]}_{f.suffix.lstrip('.')}"
            n = 1
            while candidate.lower() in taken:
                n += 1
                candidate = f"{name}_{n}"
            taken.add(candidate.lower())
            names[f] = candidate
    return {f: names[f] + ".png" for f in files}


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags (ValueError naming the flag) before any image is read."""
    for flag, value, least in (("--max-side", args.max_side, 1),
                               ("--min-side", args.min_side, 0),
                               ("--holdout-every", args.holdout_every, 1)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be {'positive' if least else '0 or more'}")
    for source in args.source:
        if not source.is_dir():
            raise ValueError(f"--source {source}: "
                             f"{'not a folder' if source.exists() else 'folder not found'}")
    existing = args.out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {args.out}: not a folder ({existing} is a file)")


def main(argv: Sequence[str] | None = None) -> int:
    """Collect, downscale and split the images; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--min-side", type=int, default=256, help="smaller images are left out")
    parser.add_argument("--holdout-every", type=int, default=5)
    parser.add_argument("--heldout", action="append", default=[],
                        help="substring of paths that go to heldout/ (repeatable; replaces "
                             "--holdout-every)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="substring of paths to leave out (repeatable)")
    args = parser.parse_args(argv)
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sorted((f for f in collect(args.source)
                    if not any(x in str(f) for x in args.exclude)), key=lambda p: p.as_posix())
    if not files:
        sources = ", ".join(str(s) for s in args.source)
        excluded = " that --exclude keeps" if args.exclude else ""
        print(f"error: no image file{excluded} under --source {sources}", file=sys.stderr)
        return 2
    names = output_names(files)
    written: set[Path] = set()
    for path in files:
        try:
            img = load_image(path)
        except ImageLoadError as exc:
            print(f"skip {exc}")
            continue
        if min(img.size) < args.min_side:
            print(f"skip {path}: {img.size[0]}x{img.size[1]} is smaller than {args.min_side}")
            continue
        scale = min(1.0, args.max_side / max(img.size))
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)),
                             Image.LANCZOS)
        if args.heldout:
            held = any(x in str(path) for x in args.heldout)
        else:
            held = len(written) % args.holdout_every == args.holdout_every - 1
        split = "heldout" if held else "train"
        dest = args.out / split / names[path]
        dest.parent.mkdir(parents=True, exist_ok=True)
        img.save(dest)
        written.add(dest)
        print(f"{split}: {dest.name} {img.size[0]}x{img.size[1]} from {path}")
    print(f"{len(written)} images written under {args.out}")
    stale = sorted(p for split in ("train", "heldout") for p in (args.out / split).glob("*.png")
                   if p not in written)
    if stale:
        print(f"note: {len(stale)} other PNG file(s) under {args.out} were not written by this "
              f"run (e.g. {stale[0]}); delete them if they are left from an earlier one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
