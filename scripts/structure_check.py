"""How legible the code's structure is, measured: what a newcomer must read, and where it goes.

    UV_CACHE_DIR=.uv-cache uv run python scripts/structure_check.py [--json] [--no-step]

Prints (the last line with --json is one JSON object):
- `step_files`: the repository files whose code runs on the training thread during one optimizer
  step of the DiT stage, from the loop's fetching of its micro-batch to its EMA update, on a
  tiny dit-t/2 run on the CPU; `data_files`: those the prefetch thread runs meanwhile, reading
  the next micro-batch's latents (a step waits for them only when they are late);
- `long_files`: files outside tests/ and bench/ over `MAX_FILE_LINES` lines;
- `long_functions`: functions in training/ over `MAX_FUNCTION_LINES` lines;
- `root_imports`: imports that run back up: a module of the training package importing a root
  script (train.py, cache.py; `bucketing` is a library module that is also runnable), or
  inference/ or models/ importing the packages that build on them.
Exit status 1 when a limit is broken (`MAX_STEP_FILES` included), else 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_STEP_FILES = 6
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# runnable only (`bucketing` is also a library; `inference` names the package, which shadows
# inference.py for imports anyway)
ROOT_SCRIPTS = {"train", "cache"}
SKIP_DIRS = {"tests", "bench", ".venv", ".uv-cache", ".cache", "runs", "checkpoints", ".git"}


def source_files() -> list[Path]:
    """Every .py file of the repository outside tests/, bench/ and generated folders."""
    return sorted(p for p in REPO.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(REPO).parts[:-1]))


def long_files() -> dict[str, int]:
    """Files over MAX_FILE_LINES lines: {path: lines}."""
    counts = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines())
              for p in source_files()}
    return {path: n for path, n in counts.items() if n > MAX_FILE_LINES}


def long_functions() -> dict[str, int]:
    """Functions of training/ over MAX_FUNCTION_LINES lines: {path:name: lines}."""
    found = {}
    for path in (REPO / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(REPO).as_posix()}:{node.name}"] = lines
    return found


def root_imports() -> list[str]:
    """Imports that run back up: training/ importing a root script, inference/ or models/
    importing training/ (`path: module`)."""
    found = []
    for path in source_files():
        package = path.relative_to(REPO).parts[0]
        if package not in ("training", "inference", "models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if (top in ROOT_SCRIPTS or (package in ("inference", "models")
                                             and top == "training")
                        or (package == "models" and top == "inference")):
                    found.append(f"{path.relative_to(REPO).as_posix()}: {name}")
    return found


def step_files() -> dict[str, list[str]]:
    """{"step_files": [...], "data_files": [...]}: the repository files whose code runs during one
    DiT optimizer step on the training thread and on the prefetch thread (see the module
    docstring), each in first-seen order."""
    import torch

    from models.vae import AutoencoderKL, VAEConfig
    from models.vae_weights import save_vae
    from training import loop
    from training.config import Config, from_dict
    from training.dit_stage import train_dit

    seen: dict[str, dict[str, None]] = {"step_files": {}, "data_files": {}}
    tracing = threading.Event()
    trainer = threading.get_ident()
    this = Path(__file__).resolve()

    def profile(frame, event, arg):
        if tracing.is_set() and event == "call":
            file = Path(frame.f_code.co_filename)
            if (REPO in file.parents and file != this
                    and not SKIP_DIRS & set(file.relative_to(REPO).parts)):
                which = "step_files" if threading.get_ident() == trainer else "data_files"
                seen[which].setdefault(file.relative_to(REPO).as_posix())

    real_step = loop.StageSteps.__init__

    def traced_init(self, loss, update, *rest):
        calls = {"n": 0}

        def traced_loss(data):
            calls["n"] += 1
            return loss(data)

        def traced_update(finite):
            if calls["n"] == 10:  # the 10th step ends with its EMA update, just before this
                tracing.clear()
            update(finite)
            if calls["n"] == 9:  # the 10th step starts with fetching its batch
                tracing.set()

        real_step(self, traced_loss, traced_update, *rest)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                      latent_channels=4, sample_size=32, force_upcast=False,
                                      scaling_factor=1.0, shift_factor=0.0))
        cfg = {"stage": "dit", "run_dir": str(work / "run"), "batch_size": 2,
               "data": {"dataset": "synthetic:12", "resolution": 32, "num_workers": 0,
                        "use_classes": True},
               "train": {"max_steps": 12, "log_every": 1000, "eval_every": 1000,
                         "ckpt_every": 0, "sample_every": 1000, "precision": "fp32",
                         "device": "cpu"},
               "dit": {"model": "dit-t/2", "vae": str(save_vae(vae, work / "vae")),
                       "cache_dir": str(work / "cache"), "sample_sizes": ["32x32"],
                       "sample_steps": 1, "num_samples": 1, "base_tokens": 64}}
        loop.StageSteps.__init__ = traced_init
        sys.setprofile(profile)
        threading.setprofile(profile)
        try:
            train_dit(from_dict(Config, cfg))
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            loop.StageSteps.__init__ = real_step
    return {key: list(files) for key, files in seen.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--no-step", action="store_true",
                        help="leave out the traced training step (static checks only)")
    args = parser.parse_args(argv)
    report = {"long_files": long_files(), "long_functions": long_functions(),
              "root_imports": root_imports()}
    if not args.no_step:
        report.update(step_files())
    broken = (report["long_files"] or report["long_functions"] or report["root_imports"]
              or len(report.get("step_files", [])) > MAX_STEP_FILES)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value if value else 'none'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
