"""Convergence per wall-clock second: DiT recipes trained for equal time budgets, then judged.

A recipe is a name and config overrides (dotted keys over `--config`, default
configs/default.json): the built-in `plain` is that config as it is (dit-xs/2 at lr 1e-3), the
others come from the command line (`--recipe NAME='{"dit.model": "dit-s/2", "train.lr":
3e-4}'`, repeatable), each at its own learning rate. Every recipe trains on the same data (the
quickstart's synthetic set, `--dataset synthetic`: 256 pictures, their families as classes,
`--holdout` of them kept for validation), with the same seed and the same VAE, at the same
`--resolution`, `--threads` CPU threads and device, for each of the `--budgets` (seconds of
training, default 120 300 600). Overrides of what must stay equal (the seed, `data.*`,
`dit.vae`, `dit.cache_dir`, the device, threads and the bookkeeping this script sets) are
refused.

How. The latent cache of the training and validation images is built once, in this process,
before any recipe trains (every recipe reuses it; building it counts for none). Each recipe
then trains in `train.py` subprocesses, one per budget: the first starts the run, each next one
resumes the checkpoint of the one before (`--resume`: weights, EMA, optimizer, schedule
position and the per-step noise carry on exactly as in one long run). A subprocess is stopped
with SIGTERM once it has trained for the rest of its budget; the run finishes the step, saves a
checkpoint and exits, so every budget has a checkpoint of its own and none is saved while the
clock runs. Start-up (imports, VAE, scan, cache check) is not training: the bench counts a
subprocess's time from the first showing of its training loop's progress bar ("STEP/MAX ["
in its output), which the loop draws once it has taken the stop signals and started its step
clock. The training time reported is exact: the run logs every step
(`train.log_every` 1) and `speed/samples_per_s` of each step gives that step's time, without
checkpoints (training/loop.py `StepRate`); the next subprocess trains for what is left of its
budget by that count. In-run validation and sample grids are off (`eval_every`,
`sample_every` out of reach): they would eat the budget.

Then, for each budget's checkpoint, in this process with the same threads: the EMA weights
(training/export.py `load_generator`) draw `--samples-per-class` pictures of every class at
resolution x resolution with the recipe's sampler, sampling steps and CFG scale (inference
`generate`, seed `--eval-seed`, the same for every recipe and budget), which
scripts/synthetic_check.py `check` judges: `accuracy` is the share of pictures whose pattern
family is the class asked for, `per_class` the same per class. `val_loss_bins` is the EMA
model's validation loss per timestep bin on the held-out latents, computed as the stage does
in-run (training/dit_stage.py `validation_latents`, `validation_loss`; seeded, so recipes
compare), `val_loss` their mean. `samples_per_s` is training samples over the training time.
The first recipe is the peer: every result also gives its accuracy minus the peer's and its
validation loss over the peer's at the same budget.

With `--captions` the recipes train text-to-image on the synthetic set's captions instead of
its classes (the built-in text encoder unless a recipe sets `text.encoder`), and each budget's
checkpoint draws 4 × `--samples-per-class` pictures of held-out prompts
(training/synthetic.py `heldout_prompts`: combinations of family and colour pair that no
training picture shows, families in turn): `accuracy` is then the share whose family is the
prompt's, `colour` the share of the prompts' colours (background and foreground) found, and
`both_colours` the share with both right (chance: 1/4, about 1/9 and 1/72).

Progress lines go to stderr, the subprocesses' output to WORK/<stamp>/logs/; the last line on
stdout is one JSON object. Each invocation writes a new folder WORK/<stamp>/ (runs, configs,
logs), and deletes a checkpoint once it is evaluated unless `--keep-checkpoints`. `--plot
FILE.png` draws accuracy against training seconds per recipe (with PIL: matplotlib is not a
dependency). Other jobs on the machine slow every figure; the load average is reported.

    UV_CACHE_DIR=.uv-cache uv run python bench/convergence.py \\
        --recipe s2='{"dit.model": "dit-s/2", "train.lr": 3e-4}' --plot convergence.png
    UV_CACHE_DIR=.uv-cache uv run python bench/convergence.py --budgets 30 60 \\
        --samples-per-class 8 --recipe tiny='{"dit.model": "dit-t/2"}'  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from training.config import Config

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/convergence.py` as well as `python -m ...`
    sys.path.insert(0, str(REPO))

BIG = 10**9  # steps: out of reach, so that only the bench's signals end a run
FIXED_KEYS = ("seed", "stage", "run_dir", "data.", "dit.vae", "dit.cache_dir", "train.device",
              "train.threads", "train.max_steps", "train.ckpt_every", "train.keep_last",
              "train.eval_every", "train.sample_every", "train.log_every")
POLL_S = 0.05  # how often the bench looks whether a subprocess is still alive


# -- recipes and their configs ------------------------------------------------------------------
def parse_recipe(text: str) -> tuple[str, dict]:
    """`NAME={"dotted.key": value, ...}` -> (NAME, overrides); ValueError saying what is wrong."""
    name, sep, body = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--recipe {text!r}: expected NAME='{{\"dotted.key\": value}}' with a "
                         "name of letters, digits, - and _")
    try:
        overrides = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--recipe {name}: overrides are not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--recipe {name}: expected a JSON object of dotted config keys")
    fixed = [k for k in overrides if any(k == f or (f.endswith(".") and k.startswith(f))
                                         for f in FIXED_KEYS)]
    if fixed:
        raise ValueError(f"--recipe {name}: {', '.join(fixed)} must be the same for every "
                         "recipe (set by the bench's own flags)")
    return name, overrides


def recipe_config(args: argparse.Namespace, overrides: dict, run_dir: Path) -> Config:
    """The config a recipe trains with: `--config`, the bench's shared settings, the recipe's
    `overrides`, then the bookkeeping that lets only the bench's signals end the run."""
    from training.config import absolute_config, apply_overrides, load_config, validate_config

    cfg = absolute_config(load_config(args.config))
    shared = {"stage": "dit", "seed": args.seed, "data.dataset": args.dataset,
              "data.use_classes": not args.captions, "data.captions": args.captions,
              "data.holdout": args.holdout,
              "data.resolution": args.resolution, "train.device": args.device,
              "train.threads": args.threads}
    if args.vae:
        shared["dit.vae"] = os.path.abspath(args.vae)
    apply_overrides(cfg, shared)
    apply_overrides(cfg, overrides)
    apply_overrides(cfg, {"run_dir": str(run_dir), "train.max_steps": BIG,
                          "train.ckpt_every": 0, "train.keep_last": len(args.budgets) + 1,
                          "train.eval_every": BIG, "train.sample_every": BIG,
                          "train.log_every": 1})
    return validate_config(cfg)


# -- preparation: the latent cache and the validation latents, once ----------------------------
def prepare(cfg: Config, device: torch.device) -> tuple[list, list[str]]:
    """Build (or check) the latent cache of the training and held-out images in this process;
    returns the validation chunks (`training.dit_stage.validation_latents`) and the class
    names (the families, for captions too)."""
    from models.vae_weights import vae_fingerprint
    from training.conditions import run_condition
    from training.distributed import DistInfo
    from training.dit_stage import cache_latents, load_stage_vae, validation_latents
    from training.plan import plan_data
    from training.synthetic import FAMILIES

    info = DistInfo(0, 1, 0, device)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report
        vae = load_stage_vae(cfg, info.device)
        fingerprint = vae_fingerprint(vae)
        plan = plan_data(cfg, info)
        if not plan.class_names and not cfg.data.captions:
            raise ValueError(f"{cfg.data.dataset}: no classes found")
        reader, fingerprint = cache_latents(cfg, plan, vae, info, fingerprint)
        reader.close()
        # the validation images' conditions: classes, or captions (a frozen text encoder
        # caches them here, and the runs reuse the cache)
        val = validation_latents(cfg, plan, vae, info, fingerprint,
                                 run_condition(cfg, plan, info).evaluate)
    if not val:
        raise ValueError(f"{cfg.data.dataset}: no held-out images for the validation loss "
                         "(--holdout)")
    return val, plan.class_names or list(FAMILIES)


# -- training -----------------------------------------------------------------------------------
def trained(run_dir: Path, samples_per_step: int) -> tuple[int, float]:
    """(last step, seconds of training) of a run that logged every step: each step's time is
    samples_per_step / its speed/samples_per_s (checkpoints left out)."""
    from scripts.loss_curves import read_scalars

    events = read_scalars(run_dir, ["speed/samples_per_s"]).get("speed/samples_per_s", [])
    seconds, last = 0.0, 0
    for step, value in events:  # a resume's abandoned steps are left out
        seconds += samples_per_step * (step - last) / value
        last = step
    if not last:
        raise RuntimeError(f"{run_dir}/tb: no speed/samples_per_s logged")
    return last, seconds


def _copy_output(stream, log: Path, started: threading.Event) -> None:
    """Copy a child's output to `log` as it comes; set `started` once its training loop's
    progress bar ("STEP/BIG [") shows: the loop has taken the stop signals and started its
    step clock (training/loop.py `train_loop`)."""
    marker, seen = f"/{BIG} [".encode(), b""
    with open(log, "ab") as out:
        while chunk := stream.read1(65536):
            out.write(chunk)
            out.flush()
            if not started.is_set():
                seen = seen[-64:] + chunk
                if marker in seen:
                    started.set()


def train_segment(config_file: Path, seconds: float, resume: bool, env: dict, log: Path,
                  startup_limit: float = 1800.0) -> None:
    """One `train.py` process over `config_file` (resuming its run's newest checkpoint with
    `resume`): wait for its training loop to start, let it train `seconds` (at least one step),
    stop it with SIGTERM and wait until it has saved its checkpoint and exited."""
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config_file)]
    cmd += ["--resume"] if resume else []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    started = threading.Event()
    copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, started), daemon=True)
    copier.start()
    try:
        deadline = time.monotonic() + startup_limit
        while not started.wait(POLL_S):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: its training loop did not start (exit "
                                   f"status {proc.poll()}); see {log}:\n{_tail(log)}")
        try:
            proc.wait(timeout=max(seconds, 0.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the bench itself failed or was interrupted
            proc.kill()
            proc.wait()
        copier.join()
    if code != 128 + signal.SIGTERM:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}, expected a stop on SIGTERM "
                           f"({128 + signal.SIGTERM}); see {log}:\n{_tail(log)}")


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:]


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(checkpoint: Path, cfg: Config, val: list, args: argparse.Namespace,
             device: torch.device) -> dict:
    """Class accuracy of the checkpoint's EMA samples (scripts/synthetic_check.py) and its
    validation loss per timestep bin."""
    import torch

    from inference.pipelines import generate, to_uint8
    from scripts.synthetic_check import Truth, accuracy
    from training.dit_stage import validation_loss
    from training.export import load_generator
    from training.flow import RectifiedFlow
    from training.runtime import autocast_dtype

    d = cfg.dit
    model, vae, info = load_generator(checkpoint, device=device)
    amp = autocast_dtype(cfg.train.precision, device)
    if args.captions:  # held-out prompts: combinations of family and colours never trained on
        from training.synthetic import heldout_prompts

        prompts = heldout_prompts(4 * args.samples_per_class, args.eval_seed)
        cond = model.condition.batch([text for text, _ in prompts])
        truths = [params for _, params in prompts]
    else:
        labels = [c for c in range(info.num_classes) for _ in range(args.samples_per_class)]
        cond = model.condition.batch(labels)
        truths = [Truth(info.class_names[c]) for c in labels]
    side = args.resolution
    images = generate(model, vae, side, side, num_samples=len(truths), cond=cond,
                      cfg_scale=d.cfg_scale, steps=d.sample_steps, sampler=d.sampler,
                      seed=args.eval_seed, base_tokens=d.base_tokens, autocast_dtype=amp,
                      batch_size=args.eval_batch)  # (B, 3, side, side)
    summary = accuracy(list(to_uint8(images)), truths)
    dropout = cfg.text.dropout if args.captions else d.label_dropout
    flow = RectifiedFlow(model.condition, model.config.patch_size, d.base_tokens,
                         d.logit_mean, d.logit_std, dropout)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        bins = validation_loss(flow, model, val, d.val_bins, cfg.seed)  # (val_bins,)
    out = {"accuracy": summary["family"], "per_class": summary["per_family"],
           "val_loss": round(float(bins.mean()), 5),
           "val_loss_bins": [round(float(v), 5) for v in bins]}
    if args.captions:  # colours named by the prompt, each and both
        out.update(colour=summary["colour"], both_colours=summary["both_colours"])
    return out


# -- the report ---------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    """The CPU (or GPU), cores, torch and the load average, as reported."""
    import torch

    name = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {"host": platform.node(), "device": str(device), "name": name,
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def plot(report: dict, path: Path) -> None:
    """Accuracy against training seconds, one line per recipe, as a PNG drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 720, 440, 60, 170, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = {name: [(r["train_s"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
              for name, rows in report["results"].items()}
    longest = max([x for pts in points.values() for x, _ in pts] + [1e-3])
    tick = min(m * 10 ** e for e in range(-3, 7) for m in (1, 2, 5) if m * 10 ** e * 6 >= longest)
    x_max = tick * math.ceil(longest * 1.02 / tick)  # ticks at multiples of 1, 2 or 5 × 10^k
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * x / x_max, y0 + (y1 - y0) * y

    draw.rectangle((x0, y1, x1, y0), outline="black")
    for k in range(6):  # accuracy 0, 0.2, ..., 1
        _, y = at(0, k / 5)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((x0 - 34, y - 6), f"{k / 5:.1f}", fill="black", font=font)
    for k in range(round(x_max / tick) + 1):
        x, _ = at(k * tick, 0)
        draw.line((x, y0, x, y0 + 4), fill="black")
        draw.text((x - 10, y0 + 8), f"{k * tick:g}", fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 60, height - 22), "training seconds", fill="black", font=font)
    draw.text((x0, 8), f"class accuracy ({report['samples_per_class']} samples per class, "
              f"{report['threads']} thread(s))", fill="black", font=font)
    for i, (name, pts) in enumerate(points.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        lr = next(r["lr"] for r in report["recipes"] if r["name"] == name)
        draw.line((x1 + 12, y1 + 10 + 18 * i, x1 + 32, y1 + 10 + 18 * i), fill=colour, width=2)
        draw.text((x1 + 38, y1 + 4 + 18 * i), f"{name} (lr {lr:g})", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# -- main ---------------------------------------------------------------------------------------
def run_recipe(name: str, overrides: dict, args: argparse.Namespace, work: Path, val: list,
               env: dict, device: torch.device) -> tuple[dict, list[dict]]:
    """Train one recipe for every budget, then evaluate each budget's checkpoint."""
    from training.checkpoint import latest_checkpoint
    from training.config import save_config

    run_dir = work / "runs" / name
    cfg = recipe_config(args, overrides, run_dir)
    config_file = work / "configs" / f"{name}.json"
    save_config(cfg, config_file)
    samples_per_step = cfg.batch_size * cfg.train.grad_accum
    recipe = {"name": name, "overrides": overrides, "lr": cfg.train.lr, "model": cfg.dit.model,
              "batch_size": cfg.batch_size, "precision": cfg.train.precision,
              "sampler": cfg.dit.sampler, "sample_steps": cfg.dit.sample_steps,
              "cfg_scale": cfg.dit.cfg_scale}
    reached = []
    train_s = 0.0
    for i, budget in enumerate(args.budgets):
        train_segment(config_file, budget - train_s, i > 0, env, work / "logs" / f"{name}.log")
        step, train_s = trained(run_dir, samples_per_step)
        checkpoint = latest_checkpoint(run_dir)
        saved = int(json.loads((checkpoint / "state.json").read_text())["step"])
        if saved != step:
            raise RuntimeError(f"{checkpoint}: holds step {saved}, the log ends at step {step}")
        reached.append((budget, step, train_s, checkpoint))  # keep_last keeps them all
        print(f"[{name}] budget {budget:g} s: step {step}, {train_s:.1f} s of training, "
              f"{samples_per_step * step / train_s:.2f} samples/s", file=sys.stderr, flush=True)
    rows = []
    for budget, step, seconds, checkpoint in reached:
        start = time.perf_counter()
        row = {"budget_s": budget, "step": step, "train_s": round(seconds, 3),
               "samples_per_s": round(samples_per_step * step / seconds, 3),
               **evaluate(checkpoint, cfg, val, args, device),
               "eval_s": round(time.perf_counter() - start, 1)}
        rows.append(row)
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint)
        print(f"[{name}] budget {budget:g} s: accuracy {row['accuracy']}, validation loss "
              f"{row['val_loss']:.4f} (evaluated in {row['eval_s']} s)", file=sys.stderr,
              flush=True)
    return recipe, rows


def compare(results: dict[str, list[dict]]) -> None:
    """Add each result's accuracy minus the peer's (the first recipe) and its validation loss
    over the peer's, at the same budget."""
    peer = next(iter(results.values()))
    for rows in results.values():
        for row, base in zip(rows, peer):
            acc, ref = row["accuracy"], base["accuracy"]
            row["accuracy_vs_peer"] = (None if acc is None or ref is None
                                       else round(acc - ref, 4))
            row["val_loss_vs_peer"] = round(row["val_loss"] / base["val_loss"], 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; budgets ascending, recipes as (name, overrides) with `plain` first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON",
                        help="a recipe: NAME='{\"dit.model\": \"dit-s/2\", \"train.lr\": 3e-4}' "
                        "(dotted config keys over --config); repeatable")
    parser.add_argument("--no-plain", action="store_true",
                        help="leave out the built-in recipe `plain` (--config as it is)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[120.0, 300.0, 600.0],
                        help="seconds of training at which every recipe is judged")
    parser.add_argument("--config", default=str(REPO / "configs" / "default.json"),
                        help="the config every recipe starts from")
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic or synthetic:N (the checker knows only that set)")
    parser.add_argument("--captions", action="store_true",
                        help="train text-to-image on the synthetic captions and judge samples "
                        "of held-out prompts (family and colours) instead of classes")
    parser.add_argument("--holdout", type=int, default=16,
                        help="images held out for the validation loss")
    parser.add_argument("--resolution", type=int, default=128,
                        help="training bucket resolution and the side of the judged samples")
    parser.add_argument("--vae", default=None, help="VAE of every recipe (default: the config's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of training and evaluation")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="training and evaluation device")
    parser.add_argument("--seed", type=int, default=0, help="the training seed of every recipe")
    parser.add_argument("--samples-per-class", type=int, default=64,
                        help="EMA samples judged per class at each budget")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the judged samples")
    parser.add_argument("--eval-batch", type=int, default=32, help="samples drawn at once")
    parser.add_argument("--work", default=str(REPO / ".cache" / "bench_convergence"),
                        help="where each invocation writes a new folder of runs and logs")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each budget's checkpoint (WORK/STAMP/runs/NAME/checkpoints/"
                        "step_N) instead of deleting it once evaluated")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw accuracy against training seconds per recipe")
    args = parser.parse_args(argv)
    from training.config import is_synthetic

    if not is_synthetic(args.dataset):
        parser.error(f"--dataset {args.dataset!r}: expected synthetic or synthetic:N")
    if any(b <= 0 for b in args.budgets) or args.samples_per_class < 1 or args.threads < 1:
        parser.error("budgets, --samples-per-class and --threads must be positive")
    args.budgets = sorted(set(args.budgets))
    recipes = [] if args.no_plain else [("plain", {})]
    try:
        recipes += [parse_recipe(text) for text in args.recipe]
    except ValueError as exc:
        parser.error(str(exc))
    names = [name for name, _ in recipes]
    if not recipes or len(set(names)) < len(names):
        parser.error(f"expected at least one recipe, each name once; got {names}")
    args.recipes = recipes
    return args


def main(argv: list[str] | None = None) -> None:
    """Prepare the cache, train and judge every recipe, print the JSON report last."""
    args = parse_args(argv)
    from dotenv import load_dotenv

    load_dotenv(REPO / ".env")  # LDM_CACHE_DIR: the synthetic set and the latent cache
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    work = Path(args.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    while work.exists():  # two invocations within a second
        work = work.with_name(work.name + "x")
    (work / "logs").mkdir(parents=True)
    # the children's progress bar tells when their training loops start: not disabled
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TQDM_")},
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    val, classes = prepare(recipe_config(args, {}, work / "runs" / "_prepare"), device)
    prepare_s = time.perf_counter() - start
    print(f"latent cache ready in {prepare_s:.1f} s; {sum(len(x) for x, _ in val)} held-out "
          f"latents", file=sys.stderr, flush=True)
    recipes, results = [], {}
    for name, overrides in args.recipes:
        recipe, rows = run_recipe(name, overrides, args, work, val, env, device)
        recipes.append(recipe)
        results[name] = rows
    compare(results)
    report = {"bench": "convergence", "machine": machine(device), "threads": args.threads,
              "load_average_before": load_before, "dataset": args.dataset,
              "holdout": args.holdout, "resolution": args.resolution, "seed": args.seed,
              "vae": recipe_config(args, {}, work).dit.vae,
              "samples_per_class": args.samples_per_class, "eval_seed": args.eval_seed,
              # accuracy of pictures the checker cannot tell apart: all judged one family
              "chance": round(1 / len(classes), 4),
              "budgets": args.budgets, "peer": recipes[0]["name"], "recipes": recipes,
              "prepare_s": round(prepare_s, 1), "work": str(work), "results": results}
    if args.plot:
        plot(report, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
