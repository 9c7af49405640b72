"""Training throughput of models/dit.py against diffusers' DiTTransformer2DModel, in one run.

For every model size, latent bucket and precision: samples/s of one full training step (the
rectified-flow loss of training/flow.py, backward, fused AdamW step) of our DiT and of diffusers'
DiT with the same width, depth, heads, patch size and token count, timed alternately (the order
flips every repeat) and summarised by medians; ratio = ours / peer, above 1 means we are faster.
Between the repeats the same run times a large square matmul in the step's dtype: the machine's
matmul peak. MFU = our FLOPs per training sample (3 x `DiT.flops_per_sample`: matmuls only) x
samples/s / that peak (`peer_mfu` uses the same FLOP count). bfloat16 rows run under autocast
with fp32 weights, as training does. Then a scaling table of our step time against token count
and against batch size.

Peak memory covers at least `--memory-steps` full training steps (default 2; 0 skips it, 1 is
refused), so that one of them runs with the optimizer state alive: AdamW allocates its two moment
buffers at the end of its first step, and from the second step on parameters, gradients, AdamW
state and activations coexist, as all through training. On CUDA: torch.cuda.max_memory_allocated
from each model's build through its untimed steps, max(--warmup, --memory-steps) of them for both
models, compiled or not, less what was allocated before the build (in process, so a compiled
model is compiled once): the tensors PyTorch's CUDA allocator hands out, not its cached free
blocks or the CUDA context. On CPU each (model, bucket, dtype, implementation) runs
`--memory-steps` steps in a fresh subprocess and reports the rise of the peak resident set
(VmHWM) over the resident set just before the model is built, so it also counts allocator slack,
alike for both models; the modules a step imports lazily (diffusers, torch._dynamo) are imported
before that baseline in both.

diffusers' DiT unpatchifies its output as a square (side = sqrt(tokens)), so it cannot run a
non-square bucket; such rows report the peer as null with the error in `note`.

The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/train.py --models dit-s/2 --latents 32x32 \\
        --repeats 3
    python bench/train.py --models dit-xl/2 --latents 32x32 --batch 64 --compile  # on a GPU
    # ours compiled against diffusers' DiT as it ships (eager): what a user of each gets
    python bench/train.py --models dit-s/2 --latents 32x32 --compile ours
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/train.py` as well as `python -m bench.train`
    sys.path.insert(0, str(REPO))

from models.dit import TIMESTEP_SCALE, DiT  # noqa: E402
from models.registry import MODEL_NAMES, dit_config  # noqa: E402
from models.conditioning import ClassCondition  # noqa: E402
from training.flow import RectifiedFlow  # noqa: E402
from training.runtime import keep_freed_memory  # noqa: E402

LATENT_CHANNELS = 4  # SD-style latents, as in the DiT paper
NUM_CLASSES = 1000  # ImageNet-sized label set; label dropout adds the null class
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Step = Callable[[], None]


def parse_latent(text: str) -> tuple[int, int]:
    """'40x24' -> (height 24, width 40): latent buckets are WIDTHxHEIGHT like image buckets."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent {text!r} is not WIDTHxHEIGHT") from None
    return h, w


def build_model(impl: str, name: str, height: int, width: int, device: torch.device,
                seed: int) -> tuple[torch.nn.Module, Callable]:
    """Our DiT or diffusers' DiT of the named size, and its velocity function (x, t, y) -> v.

    The peer gets the same width, depth, heads and patch size; its timestep is t * 1000, as ours
    scales t internally, and its `sample_size` is the latent height.
    """
    torch.manual_seed(seed)
    cfg = dit_config(name, LATENT_CHANNELS, NUM_CLASSES)
    if impl == "ours":
        with device:  # initialise on the device: a CPU init of dit-xl/2 takes seconds
            model = DiT(cfg)
        return model, model
    from diffusers import DiTTransformer2DModel

    with device:
        model = DiTTransformer2DModel(
            num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.hidden_size // cfg.num_heads,
            in_channels=cfg.in_channels,
            num_layers=cfg.depth,
            patch_size=cfg.patch_size,
            sample_size=height,
            num_embeds_ada_norm=NUM_CLASSES,
            norm_type="ada_norm_zero",
        )

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return model(x, t * TIMESTEP_SCALE, y, return_dict=False)[0]

    return model, velocity


def compiled(args: argparse.Namespace, impl: str) -> bool:
    """Whether `impl` ("ours" or "peer") runs compiled under --compile none|both|ours."""
    return args.compile == "both" or (args.compile == "ours" and impl == "ours")


def make_step(model: torch.nn.Module, velocity: Callable, height: int, width: int, batch: int,
              dtype: torch.dtype, device: torch.device, compile_model: bool, seed: int) -> Step:
    """One training step on a fixed random batch: flow loss under autocast, backward, AdamW."""
    if compile_model:  # regional: each transformer block, as train.py --compile does
        blocks = model.blocks if isinstance(model, DiT) else model.transformer_blocks
        for block in blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    flow = RectifiedFlow(ClassCondition(NUM_CLASSES))  # its patch size only sets the shift
    gen = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(batch, LATENT_CHANNELS, height, width, device=device, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=gen)
    autocast = dtype != torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = flow.loss(velocity, x0, y, generator=gen).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, steps: int, device: torch.device,
          faults: list[float] | None = None) -> float:
    """Seconds per step over `steps` back-to-back steps; appends the process's minor page
    faults per step (host memory touched for the first time) to `faults` if given."""
    synchronize(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if faults is not None:
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)
    return seconds


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int) -> Callable[[], float]:
    """A function that times `size`^3 matmuls in `dtype` for about 0.3 s and returns FLOP/s."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    flops = 2 * size**3

    def run(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b)
        synchronize(device)
        return time.perf_counter() - start

    run(1)  # warm up
    iters = max(1, math.ceil(0.3 / run(1)))
    return lambda: flops * iters / run(iters)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (Linux) and the kernels' vector extension."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    except OSError:
        pass
    return model + torch.backends.cpu.get_cpu_capability()


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM on Linux, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set of this process (Linux), or its peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def memory_child(spec: dict) -> None:
    """In a fresh process: build one model, run a few training steps, print its peak as JSON."""
    device = torch.device(spec["device"])
    h, w = spec["height"], spec["width"]
    torch.ones(1, device=device)  # initialise the device before the baseline
    # Import before the baseline, for both models alike, the modules a step would otherwise
    # import inside the measured window: diffusers (else only the peer is charged its import,
    # about 35 MB here) and torch._dynamo, which constructing AdamW imports (about 0.15 GB).
    # Module code is not training memory.
    import torch._dynamo as _dynamo  # noqa: F401  (binds no local `torch`)
    from diffusers import DiTTransformer2DModel  # noqa: F401
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # start the high-water mark at the current resident set (Linux >= 4.0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    try:
        model, velocity = build_model(spec["impl"], spec["model"], h, w, device, spec["seed"])
        step = make_step(model, velocity, h, w, spec["batch"], DTYPES[spec["dtype"]], device,
                         spec["compile"], spec["seed"])
        for _ in range(spec["steps"]):
            step()
        synchronize(device)
    except RuntimeError as err:
        print(json.dumps({"peak_bytes": None, "error": str(err).splitlines()[0]}))
        return
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - base}))


def measure_memory(impl: str, name: str, height: int, width: int, dtype: str,
                   args: argparse.Namespace) -> int | None:
    """Peak training memory (bytes) of one configuration, each in its own subprocess."""
    spec = {"impl": impl, "model": name, "height": height, "width": width, "dtype": dtype,
            "batch": args.batch, "device": args.device, "compile": compiled(args, impl),
            "steps": args.memory_steps, "seed": args.seed}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    if args.default_malloc:
        cmd.append("--default-malloc")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory subprocess for {impl} {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def bench_row(name: str, latent: str, dtype_name: str, args: argparse.Namespace,
              peaks: dict[str, list[float]]) -> dict:
    """One results row: both models timed alternately, the matmul peak timed between them."""
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    h, w = parse_latent(latent)
    with torch.device("meta"):
        reference = DiT(dit_config(name, LATENT_CHANNELS, NUM_CLASSES))
    flops = 3 * reference.flops_per_sample(h, w)  # forward + backward
    patch = reference.config.patch_size
    steps: dict[str, Step] = {}
    params: dict[str, int] = {}
    note = None
    cuda_peak: dict[str, int] = {}
    for impl in ("ours", "peer"):
        if device.type == "cuda":  # peak from this model's build through its untimed steps
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        model, velocity = build_model(impl, name, h, w, device, args.seed)
        params[impl] = sum(t.numel() for t in model.parameters())
        step = make_step(model, velocity, h, w, args.batch, dtype, device,
                         compiled(args, impl), args.seed)
        # on CUDA the untimed steps are also the memory window: at least --memory-steps of them
        untimed = max(args.warmup, args.memory_steps) if device.type == "cuda" else args.warmup
        try:
            for _ in range(untimed):
                step()
            if device.type == "cuda":
                synchronize(device)
                cuda_peak[impl] = torch.cuda.max_memory_allocated(device) - base
        except RuntimeError as err:  # diffusers' DiT on a non-square bucket
            if impl == "ours":
                raise
            note = f"diffusers DiTTransformer2DModel failed on {latent}: " \
                   f"{str(err).splitlines()[0]}"
            del model, velocity, step
            continue
        steps[impl] = step
    peak_fn = matmul_peak(dtype, device, args.peak_size)
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    faults: dict[str, list[float]] = {impl: [] for impl in steps}
    row_peaks = []
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(steps)[::-1]
        for impl in order:
            times[impl].append(timed(steps[impl], args.steps, device, faults[impl]))
        row_peaks.append(peak_fn())
    peaks[dtype_name] += row_peaks
    impls = list(steps)
    steps = model = velocity = step = None  # free both models before the memory subprocesses
    peak = statistics.median(row_peaks)  # measured between this row's repeats
    sps = {impl: args.batch / statistics.median(t) for impl, t in times.items()}
    ours, peer = sps["ours"], sps.get("peer")
    if not args.memory_steps:
        memory = {impl: None for impl in impls}
    elif device.type == "cuda":
        memory = {impl: cuda_peak.get(impl) for impl in impls}
    else:
        memory = {impl: measure_memory(impl, name, h, w, dtype_name, args) for impl in impls}
    row = {
        "model": name, "latent": latent, "tokens": (h // patch) * (w // patch),
        "batch": args.batch,
        "dtype": dtype_name,
        "ours_samples_per_s": round(ours, 4),
        "peer_samples_per_s": round(peer, 4) if peer else None,
        "ratio": round(ours / peer, 4) if peer else None,
        # ours / peer within each repeat: robust to load that changes between repeats
        "ratio_per_repeat": [round(p / o, 4) for o, p in zip(times["ours"], times["peer"])]
        if peer else [],
        "ours_step_s": [round(t, 4) for t in times["ours"]],
        "peer_step_s": [round(t, 4) for t in times.get("peer", [])],
        "ours_peak_mem": memory["ours"], "peer_peak_mem": memory.get("peer"),
        # minor page faults per step (median): freed memory returned to the OS and re-touched
        "ours_page_faults": statistics.median(faults["ours"]),
        "peer_page_faults": statistics.median(faults["peer"]) if peer else None,
        "ours_params": params["ours"], "peer_params": params["peer"],
        "ours_compiled": compiled(args, "ours"), "peer_compiled": compiled(args, "peer"),
        "flops_per_sample": flops, "peak_flops": round(peak),
        "mfu": round(flops * ours / peak, 4),
        "peer_mfu": round(flops * peer / peak, 4) if peer else None,
    }
    if note:
        row["note"] = note
    return row


def scaling_rows(args: argparse.Namespace, peaks: dict[str, list[float]]) -> list[dict]:
    """Our step time against token count (at --scaling-batch) and against batch size."""
    device, name, dtype_name = torch.device(args.device), args.models[0], args.dtypes[0]
    dtype = DTYPES[dtype_name]
    peak_fn = matmul_peak(dtype, device, args.peak_size)
    configs = [(latent, args.scaling_batch) for latent in args.scaling_latents]
    configs += [(args.scaling_latents_for_batch, b) for b in args.scaling_batches]
    rows = []
    for latent, batch in configs:
        h, w = parse_latent(latent)
        model, velocity = build_model("ours", name, h, w, device, args.seed)
        step = make_step(model, velocity, h, w, batch, dtype, device, compiled(args, "ours"),
                         args.seed)
        for _ in range(args.warmup):
            step()
        times, row_peaks = [], []
        for _ in range(args.scaling_repeats):
            times.append(timed(step, args.steps, device))
            row_peaks.append(peak_fn())
        peaks[dtype_name] += row_peaks
        step_s = statistics.median(times)
        flops = 3 * model.flops_per_sample(h, w)
        p = model.config.patch_size
        rows.append({
            "model": name, "latent": latent, "tokens": (h // p) * (w // p), "batch": batch,
            "dtype": dtype_name, "step_s": round(step_s, 4),
            "samples_per_s": round(batch / step_s, 4),
            "tokens_per_s": round(batch * (h // p) * (w // p) / step_s, 1),
            "mfu": round(flops * batch / step_s / statistics.median(row_peaks), 4),
        })
        print(f"scaling {latent} ({rows[-1]['tokens']} tokens) batch {batch}: "
              f"{step_s:.3f} s/step, MFU {rows[-1]['mfu']:.3f}", flush=True)
        del model, velocity, step
    return rows


def main() -> None:
    """Parse flags, run the table and the scaling sweep, print the JSON report last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dit-s/2", "dit-b/2"],
                        choices=MODEL_NAMES, help="model sizes from models/registry.py")
    parser.add_argument("--latents", nargs="+", default=["16x16", "32x32", "40x24"],
                        help="latent buckets, WIDTHxHEIGHT in latent pixels (32x32 is a 256 px "
                        "image through an f8 VAE)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="float32, or bfloat16 autocast over fp32 weights")
    parser.add_argument("--batch", type=int, default=16, help="samples per training step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model")
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before timing; default 1, or 3 with --compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:index]")
    parser.add_argument("--compile", nargs="?", const="both", default="none",
                        choices=["none", "both", "ours"],
                        help="torch.compile each transformer block: of both models (the flag "
                        "alone), or of ours only against diffusers' eager DiT ('ours')")
    parser.add_argument("--peak-size", type=int, default=4096,
                        help="side of the square matmul that measures the peak FLOP/s")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="training steps each peak memory covers (on CPU in a subprocess; "
                        "on CUDA the untimed steps are at least this many); 0 skips memory, "
                        "1 is refused: AdamW's state only exists from the second step on")
    parser.add_argument("--scaling-latents", nargs="*",
                        default=["16x16", "32x32", "64x64"],
                        help="buckets of the token-count sweep (64 to 1024 tokens at patch 2); "
                        "none skips it. Runs the first of --models and --dtypes")
    parser.add_argument("--scaling-batch", type=int, default=4, help="batch of the token sweep")
    parser.add_argument("--scaling-batches", nargs="*", type=int, default=[1, 4, 16],
                        help="batch sizes of the batch sweep; none skips it")
    parser.add_argument("--scaling-latents-for-batch", default="32x32",
                        help="bucket of the batch sweep")
    parser.add_argument("--scaling-repeats", type=int, default=2, help="timed repeats per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone instead of keeping freed "
                        "memory for reuse as train.py does (training/runtime.py keep_freed_memory)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    # as the training stages do; process-wide, so both models run with the same allocator
    kept = False if args.default_malloc else keep_freed_memory()
    if args.warmup is None:
        args.warmup = 3 if args.compile != "none" else 1
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    if args.memory_steps < 0 or args.memory_steps == 1:
        parser.error(f"--memory-steps: expected 0 (no memory figures) or at least 2 (a step "
                     f"with AdamW's state allocated), got {args.memory_steps}")
    # Refuse a bucket the models cannot patchify before any timing, not when its row is reached
    # (which would lose the rows before it). The table runs every model, the sweeps the first.
    buckets = [("--latents", latent, args.models) for latent in args.latents]
    buckets += [("--scaling-latents", latent, args.models[:1]) for latent in args.scaling_latents]
    if args.scaling_batches:
        buckets.append(("--scaling-latents-for-batch", args.scaling_latents_for_batch,
                        args.models[:1]))
    for flag, latent, names in buckets:
        try:
            h, w = parse_latent(latent)
        except argparse.ArgumentTypeError:
            h = w = 0
        patch = math.lcm(*(dit_config(n, LATENT_CHANNELS, NUM_CLASSES).patch_size
                           for n in names))
        if h <= 0 or w <= 0 or h % patch or w % patch:
            parser.error(f"{flag}: got {latent!r}, expected WIDTHxHEIGHT with both sides "
                         f"positive multiples of {patch} (patch size of {', '.join(names)})")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32, like the peak

    peaks: dict[str, list[float]] = {d: [] for d in DTYPES}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for name in args.models:
        for latent in args.latents:
            for dtype_name in args.dtypes:
                row = bench_row(name, latent, dtype_name, args, peaks)
                results.append(row)
                peer = f"{row['peer_samples_per_s']:.3f}" if row["peer_samples_per_s"] else "n/a"
                print(f"{name} {latent} {dtype_name} batch {args.batch}: ours "
                      f"{row['ours_samples_per_s']:.3f} samples/s, peer {peer}, ratio "
                      f"{row['ratio']}, MFU {row['mfu']:.3f} (peak "
                      f"{row['peak_flops'] / 1e9:.0f} GFLOP/s), memory ours "
                      f"{row['ours_peak_mem']} peer {row['peer_peak_mem']}", flush=True)
    scaling = scaling_rows(args, peaks) if args.scaling_latents or args.scaling_batches else []
    report = {
        "device": args.device,
        "device_name": device_name(args.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        # 1-minute load average before and after: other processes on the machine slow every
        # figure here, and multi-threaded elementwise kernels most of all
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        if load_before else None,
        "compile": args.compile, "repeats": args.repeats, "steps_per_repeat": args.steps,
        "optimizer": "AdamW(fused=True)", "keep_freed_memory": kept,
        "peak_flops": {d: round(statistics.median(p)) for d, p in peaks.items() if p},
        "results": results, "scaling": scaling,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
