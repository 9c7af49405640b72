"""Benchmark models/vae.py against diffusers' AutoencoderKL: same config, identical weights.

Times encode and decode (images/s) for both models alternately over several repeats and reports
medians, their ratios (ours / peer, above 1 means we are faster) and the largest absolute output
difference. The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/vae.py --resolution 256 --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/vae.py` as well as `python -m bench.vae`
    sys.path.insert(0, str(REPO))

from models.vae import AutoencoderKL, VAEConfig  # noqa: E402

DEFAULT_CONFIG = REPO / "vae" / "config.json"
# Used when vae/config.json does not exist: the SD layout at reduced width (f = 8, 4 channels).
SMALL_F8 = VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2, sample_size=256)


def read_config(parser: argparse.ArgumentParser, path: Path | None) -> VAEConfig:
    """The VAE config at `path`, or SMALL_F8 for None; refuses a missing or invalid file."""
    if path is None:
        return SMALL_F8
    if not path.is_file():
        parser.error(f"--config: {path} is not a file; expected a VAE config.json")
    try:
        return VAEConfig.from_json(path)
    except (OSError, ValueError) as err:  # unreadable, not JSON, or not a VAE config
        parser.error(f"--config: {str(err).splitlines()[0]}")


def build_pair(config: VAEConfig, seed: int) -> tuple[AutoencoderKL, torch.nn.Module]:
    """Our model and diffusers' AutoencoderKL holding the same random weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")}
    peer = DiffusersAutoencoderKL(**kwargs)
    with torch.no_grad():  # non-trivial GroupNorm affines, so differences would show
        for module in peer.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    ours = AutoencoderKL(config)
    ours.load_state_dict(peer.state_dict())
    return ours.eval(), peer.eval()


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device's queued work finished before and after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def bench_device(
    ours: AutoencoderKL, peer: torch.nn.Module, device: torch.device, args: argparse.Namespace
) -> dict:
    """Median images/s of encode and decode for both models on one device, plus max |diff|."""
    dtype = getattr(torch, args.dtype)
    for model in (ours, peer):  # dtype only when asked: diffusers warns about any .to(dtype)
        model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    factor = ours.downsample_factor
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen) * 2 - 1
    side = args.resolution // factor
    z = torch.randn(args.batch, ours.config.latent_channels, side, side, generator=gen)
    x, z = x.to(device, dtype), z.to(device, dtype)

    passes = {
        "encode": (lambda: ours.encode(x).mean, lambda: peer.encode(x).latent_dist.mean),
        "decode": (lambda: ours.decode(z), lambda: peer.decode(z).sample),
    }
    result: dict = {}
    for name, (ours_fn, peer_fn) in passes.items():
        diff = (ours_fn().float() - peer_fn().float()).abs().max().item()  # also warms up
        for _ in range(args.warmup):
            ours_fn(), peer_fn()
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        for repeat in range(args.repeats):  # alternate which goes first
            order = [("ours", ours_fn), ("peer", peer_fn)]
            for who, fn in order if repeat % 2 == 0 else order[::-1]:
                times[who].append(timed(fn, device))
        ours_ips = args.batch / statistics.median(times["ours"])
        peer_ips = args.batch / statistics.median(times["peer"])
        result[name] = {
            "ours_images_per_s": round(ours_ips, 3),
            "peer_images_per_s": round(peer_ips, 3),
            "ratio": round(ours_ips / peer_ips, 3),
            "max_abs_diff": diff,
        }
    return result


def main() -> None:
    """Parse flags, run the benchmark on CPU (and CUDA when present), print JSON last."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"VAE config.json; default {DEFAULT_CONFIG.relative_to(REPO)} if it "
                        "exists, else a small f8 SD-layout config (block_out_channels "
                        "32,64,128,128)")
    parser.add_argument("--resolution", type=int, default=256, help="square image side, pixels")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to run on; default cpu, plus cuda when available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and inputs for both models (bfloat16 turns off our "
                        "force_upcast so both compute in bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = read_config(parser, config_path)
    factor = config.downsample_factor
    if args.resolution <= 0 or args.resolution % factor:  # else decode would run a smaller image
        parser.error(f"--resolution: got {args.resolution}, expected a positive multiple of "
                     f"the VAE's downsample factor {factor}")
    if args.dtype != "float32":
        config.force_upcast = False
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    ours, peer = build_pair(config, args.seed)
    report = {
        "config": str(config_path) if config_path else "small-f8",
        "block_out_channels": list(config.block_out_channels),
        "latent_channels": config.latent_channels,
        "resolution": args.resolution,
        "batch": args.batch,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": {},
    }
    for name in devices:
        device = torch.device(name)
        result = bench_device(ours, peer, device, args)
        report["results"][name] = result
        for pass_name, row in result.items():
            print(f"{name} {pass_name}: ours {row['ours_images_per_s']:.2f} img/s, peer "
                  f"{row['peer_images_per_s']:.2f} img/s, ratio {row['ratio']:.3f}, "
                  f"max |diff| {row['max_abs_diff']:.2e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
