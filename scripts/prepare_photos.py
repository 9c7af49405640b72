"""Collect real photographs into a train / held-out folder pair for VAE training.

    python scripts/prepare_photos.py --source /usr/share/wallpapers --source DIR ... --out DIR

Every raster image under each source is loaded with the repo's robust loader, downscaled so its
longer side is at most `--max-side` (never upscaled) and saved as PNG. Wallpaper folders hold one
picture at several sizes named like 1920x1080.jpg: only the largest of those is kept. Files are
sorted by name and every `--holdout-every`-th (or those matching `--heldout`) goes to `heldout/`,
the rest to `train/`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from training.data import IMAGE_EXTENSIONS, ImageLoadError, load_image  # noqa: E402

SIZE_NAME = re.compile(r"^(\d+)x(\d+)$")


def collect(sources: list[Path], min_side: int) -> list[Path]:
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


def main() -> int:
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
    args = parser.parse_args()
    files = [f for f in collect(args.source, args.min_side)
             if not any(x in str(f) for x in args.exclude)]
    kept = 0
    for i, path in enumerate(sorted(files, key=lambda p: p.as_posix())):
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
            held = kept % args.holdout_every == args.holdout_every - 1
        split = "heldout" if held else "train"
        name = "_".join(path.parts[-4:]).replace(" ", "_")
        dest = args.out / split / (Path(name).stem + ".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        img.save(dest)
        print(f"{split}: {dest.name} {img.size[0]}x{img.size[1]}")
        kept += 1
    print(f"{kept} images written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
