"""Benchmark caption encoding with frozen text encoders against reading the text cache.

Builds a tiny random-weight CLIP text model (with projection) and T5 encoder like the tests'
(`tests/training/text_encoder_files.py`), then measures on N synthetic captions:

(a) captions/s of `FrozenTextEncoder.encode` for each encoder, on the CPU;
(b) captions/s of `TextEmbeddingCache.ensure` building the cache from scratch (encode + write);
(c) captions/s of `TextEmbeddingCache.get` on a freshly opened cache (headers, then lazy reads),
    and its ratio to (a): what a training step saves by reading instead of encoding.

The encoders are tiny, so (a) is a floor for the pipeline's overhead, not a real encoder's speed.
The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/text_encode.py --captions 300 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/text_encode.py` as well as `-m`
    sys.path.insert(0, str(REPO))

from tests.training.text_encoder_files import make_clip_text, make_t5_encoder  # noqa: E402
from training.text_cache import TextEmbeddingCache  # noqa: E402
from training.text_encoders import load_text_encoder  # noqa: E402

SUBJECTS = ["a cat", "an old man", "two children", "a red car", "a lighthouse", "a robot",
            "a bowl of fruit", "a sailing ship", "a mountain village", "a honeybee"]
PLACES = ["on a beach", "in a busy market", "under a clear sky", "at night", "in the rain",
          "on a wooden table", "in a snowy forest", "next to a river", "in times square"]
STYLES = ["photo", "oil painting", "watercolor sketch", "digital art", "35mm film still",
          "black and white portrait", "macro photograph"]


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """`count` distinct captions of varied length, like alt-texts of a photo data set."""
    rng = random.Random(seed)
    captions = []
    for i in range(count):
        words = [rng.choice(STYLES), "of", rng.choice(SUBJECTS), rng.choice(PLACES)]
        words += ["with", rng.choice(SUBJECTS)] * rng.randint(0, 3)
        captions.append(f"{' '.join(words)}, number {i}")
    return captions


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def measure(kind: str, folder: Path, captions: list[str], batch_size: int, work: Path) -> dict:
    """Encode, build and read figures for one encoder folder."""
    encoder = load_text_encoder(folder, max_length=77)
    encoder.encode(captions[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    encoder.encode(captions, batch_size=batch_size)
    encode_s = time.perf_counter() - start
    build = TextEmbeddingCache(work, encoder.fingerprint, encoder.max_length).ensure(
        captions, encoder, batch_size=batch_size)
    start = time.perf_counter()
    cache = TextEmbeddingCache(work, encoder.fingerprint, encoder.max_length)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for low in range(0, len(captions), batch_size):
        cache.get(captions[low:low + batch_size])
    get_s = time.perf_counter() - start
    cache.close()
    return {"kind": kind, "dim": encoder.dim, "pooled_dim": encoder.pooled_dim,
            "encode_captions_per_s": _rate(len(captions), encode_s),
            "ensure_captions_per_s": round(build["captions_per_s"], 1),
            "cache_open_s": round(open_s, 4),
            "get_captions_per_s": _rate(len(captions), get_s),
            "get_over_encode": round(encode_s / get_s, 2)}


def main() -> None:
    """Run the benchmark and print its JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    captions = synthetic_captions(args.captions)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind, build in (("clip", lambda p: make_clip_text(p, projection=True)),
                            ("t5", make_t5_encoder)):
            results.append(measure(kind, build(work / kind), captions, args.batch_size,
                                   work / "cache"))
    print(json.dumps({"captions": args.captions, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
