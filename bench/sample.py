"""Benchmark sampling: our pipeline against diffusers' DiT + flow-matching Euler scheduler.

Ours: `inference.pipelines.sample_latents` + `decode_latents` (exactly what `generate` runs for
one batch) with a DiT from models/registry.py. Peer: diffusers' `DiTTransformer2DModel` of equal
width, depth, heads, patch size and token count, driven by `FlowMatchEulerDiscreteScheduler` on
the same shifted sigmas in the obvious loop (batched classifier-free guidance, one VAE decode at
the end, under `torch.no_grad` as diffusers pipelines run), decoding with diffusers'
`AutoencoderKL` holding our VAE's weights. Both run at the same dtype (autocast for bf16) and
alternate over several repeats; medians of the denoising loop, the decode and their sum are
reported, with ratios ours / peer in images per second (above 1: we are faster). Weights are
random (perturbed off their zero inits), which does not change the work done. The last line
printed is one JSON object.

With `--npz` a third pipeline joins the alternation: ours as `inference.py --npz` runs it
(`inference.npz.sample_chunk`, one chunk of `--batch` samples: sampling, decode, the uint8
conversion, then `write_chunk`'s atomic .npz write into a temporary folder), reported as
`ours_npz` with its images/s over ours plain (`npz_vs_plain`) and over the peer (`npz_ratio`).

    UV_CACHE_DIR=.uv-cache uv run python bench/sample.py --batch 2 --repeats 3 [--npz]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/sample.py` as well as `python -m bench.sample`
    sys.path.insert(0, str(REPO))

from bench.vae import build_pair, read_config  # noqa: E402
from inference.npz import NpzJob, Sampling, open_parts, sample_chunk, write_chunk  # noqa: E402
from inference.pipelines import decode_latents, initial_noise, sample_latents  # noqa: E402
from inference.samplers import token_shift  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.registry import MODEL_NAMES, build_dit, dit_config  # noqa: E402
from models.vae import VAEConfig  # noqa: E402

DEFAULT_VAE = REPO / "vae" / "config.json"


def perturb(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Move every weight off its init, so zero-initialised paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval().requires_grad_(False)


def build_peer(ours: DiT, latent_size: int, classes: int, seed: int) -> torch.nn.Module:
    """diffusers' DiT with our model's width, depth, heads, patch and latent channels."""
    from diffusers import DiTTransformer2DModel

    cfg = ours.config
    torch.manual_seed(seed)
    peer = DiTTransformer2DModel(num_attention_heads=cfg.num_heads,
                                 attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                 in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                                 num_layers=cfg.depth, patch_size=cfg.patch_size,
                                 sample_size=latent_size, num_embeds_ada_norm=classes)
    return perturb(peer, seed + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model: DiT, vae, args: argparse.Namespace, labels: list[int], steps: int,
             device: torch.device) -> tuple[float, float]:
    """Seconds for our denoising loop and our decode (one `generate` batch)."""
    latent = args.resolution // vae.downsample_factor
    _sync(device)
    start = time.perf_counter()
    z = sample_latents(model, (latent, latent), num_samples=args.batch,
                       cond=torch.tensor(labels), cfg_scale=args.cfg_scale, steps=steps,
                       sampler="euler", seed=args.seed, base_tokens=args.base_tokens,
                       autocast_dtype=args.autocast)
    _sync(device)
    mid = time.perf_counter()
    decode_latents(vae, z)
    _sync(device)
    return mid - start, time.perf_counter() - mid


def run_ours_npz(model: DiT, vae, args: argparse.Namespace, labels: list[int], steps: int,
                 device: torch.device, job: NpzJob) -> tuple[float, float]:
    """Seconds for one chunk as `inference.py --npz` makes it: sampling, decode, uint8 and the
    chunk's .npz write, timed as one piece (returned as loop seconds, 0 for the decode)."""
    sampling = Sampling(args.resolution, args.resolution, torch.tensor(labels), args.cfg_scale,
                        steps, "euler", args.seed, args.base_tokens, args.autocast, args.batch)
    _sync(device)
    start = time.perf_counter()
    write_chunk(job, 0, *sample_chunk(model, vae, job, 0, sampling))
    return time.perf_counter() - start, 0.0


@torch.no_grad()
def run_peer(peer, peer_vae, scheduler, args: argparse.Namespace, labels: list[int],
             steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds for the diffusers loop and its decode: the obvious DiTPipeline-style loop."""
    latent, channels = peer.config.sample_size, peer.config.in_channels
    sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()  # the scheduler shifts them
    _sync(device)
    start = time.perf_counter()
    scheduler.set_timesteps(sigmas=sigmas, device=device)
    latents = initial_noise(args.batch, (channels, latent, latent), args.seed).to(device)
    y = torch.tensor(labels, device=device)
    class_labels = torch.cat([y, torch.full_like(y, args.classes)])  # the null class last
    context = (torch.autocast(device.type, dtype=args.autocast) if args.autocast is not None
               else torch.autocast(device.type, enabled=False))
    with context:
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents])
            v = peer(model_input, timestep=t.expand(model_input.shape[0]),
                     class_labels=class_labels).sample
            v_cond, v_uncond = v.float().chunk(2)
            v = v_uncond + args.cfg_scale * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents).prev_sample
    _sync(device)
    mid = time.perf_counter()
    cfg = peer_vae.config
    raw = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    peer_vae.decode(raw).sample.clamp(-1, 1)
    _sync(device)
    return mid - start, time.perf_counter() - mid


def bench_device(device: torch.device, vae_config: VAEConfig, args: argparse.Namespace,
                 parts: Path) -> dict:
    """Median seconds and images/s of the pipelines on one device, alternating; with --npz,
    ours writing chunks into a job under `parts` as well."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae, peer_vae = build_pair(vae_config, args.seed)
    vae, peer_vae = vae.to(device), peer_vae.to(device)
    latent = args.resolution // vae.downsample_factor
    torch.manual_seed(args.seed)
    ours = perturb(build_dit(args.model, vae_config.latent_channels, args.classes),
                   args.seed).to(device)
    peer = build_peer(ours, latent, args.classes, args.seed).to(device)
    shift = token_shift(latent, latent, ours.config.patch_size, args.base_tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    labels = [i % args.classes for i in range(args.batch)]
    runners = {"ours": lambda n: run_ours(ours, vae, args, labels, n, device),
               "peer": lambda n: run_peer(peer, peer_vae, scheduler, args, labels, n, device)}
    if args.npz:
        job = NpzJob(parts / f"{device.type}.npz", args.batch, args.batch, {"bench": True})
        open_parts(job)
        runners["ours_npz"] = lambda n: run_ours_npz(ours, vae, args, labels, n, device, job)
    for run in runners.values():  # warm up: kernels, allocator, rope tables
        run(args.warmup_steps)
    times: dict[str, list[tuple[float, float]]] = {who: [] for who in runners}
    order = list(runners)
    for repeat in range(args.repeats):  # alternate which goes first
        for who in order if repeat % 2 == 0 else order[::-1]:
            times[who].append(runners[who](args.steps))
            print(f"{device.type} repeat {repeat} {who}: loop {times[who][-1][0]:.2f} s, "
                  f"decode {times[who][-1][1]:.2f} s", flush=True)
    result: dict = {}
    for who, rows in times.items():
        loop = statistics.median(r[0] for r in rows)
        decode = statistics.median(r[1] for r in rows)
        total = statistics.median(r[0] + r[1] for r in rows)
        result[who] = {"loop_s": round(loop, 4), "decode_s": round(decode, 4),
                       "total_s": round(total, 4),
                       "images_per_s": round(args.batch / total, 4)}
        if who == "ours_npz":  # timed as one piece
            del result[who]["loop_s"], result[who]["decode_s"]
    result["ratio"] = round(result["peer"]["total_s"] / result["ours"]["total_s"], 3)
    result["loop_ratio"] = round(result["peer"]["loop_s"] / result["ours"]["loop_s"], 3)
    result["decode_ratio"] = round(result["peer"]["decode_s"] / result["ours"]["decode_s"], 3)
    if args.npz:
        npz_total = result["ours_npz"]["total_s"]
        result["npz_vs_plain"] = round(result["ours"]["total_s"] / npz_total, 3)
        result["npz_ratio"] = round(result["peer"]["total_s"] / npz_total, 3)
    result["params_ours_m"] = round(sum(p.numel() for p in ours.parameters()) / 1e6, 2)
    result["params_peer_m"] = round(sum(p.numel() for p in peer.parameters()) / 1e6, 2)
    return result


def main() -> None:
    """Parse flags, run on CPU (and CUDA when present), print JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dit-s/2", choices=MODEL_NAMES,
                        help="our DiT; the peer copies its width, depth, heads and patch")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"VAE config.json; default {DEFAULT_VAE.relative_to(REPO)} if it "
                        "exists, else a small f8 SD-layout config (block_out_channels "
                        "32,64,128,128); weights are random")
    parser.add_argument("--resolution", type=int, default=256, help="square image side, pixels")
    parser.add_argument("--batch", type=int, default=2,
                        help="images per pipeline call (the model sees twice as many for CFG)")
    parser.add_argument("--steps", type=int, default=28, help="Euler steps")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale")
    parser.add_argument("--classes", type=int, default=10, help="class labels of both models")
    parser.add_argument("--base-tokens", type=int, default=256,
                        help="token count without timestep shift")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per pipeline")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps of the untimed warm-up call of each pipeline")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to run on; default cpu, plus cuda when available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="DiT compute dtype for both (bfloat16: autocast); VAEs stay fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="weights, noise and labels seed")
    parser.add_argument("--npz", action="store_true",
                        help="also time ours writing ADM batch chunks (uint8 + .npz write)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    args.autocast = None if args.dtype == "float32" else getattr(torch, args.dtype)
    config_path = args.config or (DEFAULT_VAE if DEFAULT_VAE.is_file() else None)
    vae_config = read_config(parser, config_path)
    factor = vae_config.downsample_factor
    patch = dit_config(args.model, vae_config.latent_channels, args.classes).patch_size
    if args.resolution <= 0 or args.resolution % (factor * patch):  # refused, not snapped:
        # the report names the resolution asked for, so it must be the one benchmarked
        parser.error(f"--resolution: got {args.resolution}, expected a positive multiple of "
                     f"{factor * patch} (VAE factor {factor} x patch {patch} of {args.model})")
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    latent = args.resolution // vae_config.downsample_factor
    report = {
        "model": args.model,
        "vae": str(config_path) if config_path else "small-f8",
        "resolution": args.resolution,
        "latent": [vae_config.latent_channels, latent, latent],
        "batch": args.batch,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "npz": args.npz,
        "results": {},
    }
    with tempfile.TemporaryDirectory() as parts:
        for name in devices:
            result = bench_device(torch.device(name), vae_config, args, Path(parts))
            report["results"][name] = result
            print(f"{name}: ours {result['ours']['images_per_s']:.3f} img/s, peer "
                  f"{result['peer']['images_per_s']:.3f} img/s, ratio {result['ratio']:.3f} "
                  f"(loop {result['loop_ratio']:.3f}, decode {result['decode_ratio']:.3f})")
            if args.npz:
                print(f"{name}: ours to npz {result['ours_npz']['images_per_s']:.3f} img/s, "
                      f"{result['npz_vs_plain']:.3f} of plain, {result['npz_ratio']:.3f} of "
                      "the peer")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
