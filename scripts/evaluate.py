"""FID, Inception Score, KID and precision / recall of a sample set against a reference set.

    python scripts/evaluate.py --inception pt_inception-2015-12-05-6726825d.pth REF SAMPLES --json

REF and SAMPLES are each an image folder (any sizes: every image is centre-cropped to a square,
then resized bilinearly to 299 as pytorch-fid does), an ADM sample batch .npz (arr_0, uint8
N x H x W x 3), or a statistics .npz (mu, sigma: FID only). An .npz with both (an ADM reference
batch) gives FID its stored statistics, as the ADM evaluator does. The pool features of folders
and .npz batches are cached under $LDM_CACHE_DIR/fid/ (default .cache/fid/), keyed by the files'
paths, sizes and modification times and by the weights' SHA-256. The weights file (never
downloaded) comes from --inception or LDM_INCEPTION in .env. A metric that an input cannot give
(IS of a statistics file, KID or precision / recall with one) is reported as n/a (null). With
--json the last line is one JSON object. Bad input is one `error:` line, exit 2. See
docs/evaluation.md for the definitions and how the numbers relate to the ADM evaluator's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/evaluate.py` as well as `-m scripts.evaluate`
    sys.path.insert(0, str(REPO_ROOT))

from dotenv import load_dotenv  # noqa: E402

MAX_SKIPPED_SHOWN = 10


def build_parser() -> argparse.ArgumentParser:
    """The command line; `--help` documents every default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("ref", metavar="REF",
                        help="reference: image folder, ADM .npz batch or statistics .npz")
    parser.add_argument("samples", metavar="SAMPLES",
                        help="samples: image folder, ADM .npz batch or statistics .npz")
    parser.add_argument("--inception", metavar="FILE", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth; None: $LDM_INCEPTION")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--device", default=None, help="torch device; default cuda if available")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network call")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding folder images")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write cached features")
    parser.add_argument("--is-splits", type=int, default=10,
                        help="Inception Score splits (fewer when a split would hold fewer "
                        "than 2 samples)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size (the smaller set's size when that is smaller)")
    parser.add_argument("--seed", type=int, default=2020, help="KID subset seed (torch-fidelity's)")
    parser.add_argument("--k", type=int, default=3, help="precision / recall neighbourhood size")
    return parser


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def evaluate(args: argparse.Namespace) -> dict:
    """All metrics of args.samples against args.ref (see the module doc) as a dict.

    Raises FileNotFoundError or ValueError, naming the path or value, on bad input.
    """
    import torch
    from tqdm import tqdm

    from models.inception import MISSING_WEIGHTS_HINT, InceptionFeatures
    from training.config import default_cache_dir
    from training.fid import (fid, inception_score, inspect_input, kid, precision_recall,
                              read_sample_set)

    weights = args.inception or os.environ.get("LDM_INCEPTION")
    if not weights:
        raise FileNotFoundError(f"no Inception weights given; {MISSING_WEIGHTS_HINT}")
    for name, value in (("--batch-size", args.batch_size), ("--workers", args.workers),
                        ("--is-splits", args.is_splits), ("--kid-subsets", args.kid_subsets),
                        ("--kid-subset-size", args.kid_subset_size), ("--k", args.k)):
        if value < 1:
            raise ValueError(f"{name} {value}: must be positive")
    for path in (args.ref, args.samples):
        inspect_input(path)  # refuse bad input before loading the network
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device (cpu, cuda, "
                         "cuda:1, ...)") from None
    extractor = InceptionFeatures(weights, device, batch_size=args.batch_size)
    cache = None if args.no_cache else default_cache_dir()

    sets = {}
    for role, path in (("ref", args.ref), ("samples", args.samples)):
        with tqdm(desc=f"{role} features", unit="img", file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            sets[role] = read_sample_set(path, extractor, cache, workers=args.workers,
                                         progress=lambda done: bar.update(done - bar.n))
        for line in sets[role].skipped[:MAX_SKIPPED_SHOWN]:
            print(f"warning: skipped {line}", file=sys.stderr)
        if len(sets[role].skipped) > MAX_SKIPPED_SHOWN:
            print(f"warning: skipped {len(sets[role].skipped) - MAX_SKIPPED_SHOWN} more files "
                  f"of {path}", file=sys.stderr)
    ref, samples = sets["ref"], sets["samples"]

    result = {"fid": fid(samples.mu, samples.sigma, ref.mu, ref.sigma),
              "is": None, "is_std": None, "kid": None, "kid_std": None,
              "precision": None, "recall": None, "n_ref": ref.n, "n_samples": samples.n,
              "is_splits": None, "kid_subsets": None, "kid_subset_size": None, "k": args.k,
              "ref": str(args.ref), "samples": str(args.samples), "ref_kind": ref.kind,
              "samples_kind": samples.kind, "ref_stats_from": ref.stats_from,
              "samples_stats_from": samples.stats_from, "ref_cached": ref.cached,
              "samples_cached": samples.cached, "skipped_ref": len(ref.skipped),
              "skipped_samples": len(samples.skipped), "inception": str(weights),
              "inception_sha256": extractor.fingerprint, "device": str(device)}
    if samples.pool is not None:
        splits = min(args.is_splits, max(1, len(samples.pool) // 2))  # 2+ samples a split
        logits = extractor.logits(torch.from_numpy(samples.pool))  # (N, 1008) float64
        result["is"], result["is_std"] = inception_score(logits, splits)
        result["is_splits"] = splits
    if samples.pool is not None and ref.pool is not None:
        size = min(args.kid_subset_size, len(samples.pool), len(ref.pool))
        # samples first: torch-fidelity's input1 (generated) draws its subset first
        result["kid"], result["kid_std"] = kid(samples.pool, ref.pool, args.kid_subsets, size,
                                               seed=args.seed, device=device)
        result["kid_subsets"], result["kid_subset_size"] = args.kid_subsets, size
        if min(len(samples.pool), len(ref.pool)) > args.k:
            result["precision"], result["recall"] = precision_recall(
                ref.pool, samples.pool, k=args.k, device=device)
    return result


def _report(r: dict) -> None:
    """Human-readable lines of an `evaluate` result."""
    def described(role: str) -> str:
        n = r[f"n_{role}"]
        count = "statistics" if n is None else f"{n} images"
        cached = ", cached features" if r[f"{role}_cached"] else ""
        both = n is not None and r[f"{role}_stats_from"] == "file"
        stored = ", FID from its stored statistics" if both else ""
        return f"{r[role]} ({r[f'{role}_kind']}, {count}{cached}{stored})"

    print(f"reference  {described('ref')}")
    print(f"samples    {described('samples')}")
    print(f"FID        {r['fid']:.4f}")
    print(f"IS         {r['is']:.4f} ± {r['is_std']:.4f} ({r['is_splits']} splits)"
          if r["is"] is not None else "IS         n/a (the samples are statistics)")
    print(f"KID        {r['kid']:.6f} ± {r['kid_std']:.6f} ({r['kid_subsets']} subsets of "
          f"{r['kid_subset_size']})" if r["kid"] is not None
          else "KID        n/a (needs features of both sets)")
    if r["precision"] is not None:
        print(f"precision  {r['precision']:.4f}\nrecall     {r['recall']:.4f}   (k = {r['k']})")
    else:
        print(f"precision / recall n/a (needs features of more than k = {r['k']} images in "
              "both sets)")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the metrics of SAMPLES against REF; 2 on bad input."""
    load_dotenv(REPO_ROOT / ".env")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line each
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except (FileNotFoundError, ValueError) as exc:
        return _refuse(str(exc))
    _report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
