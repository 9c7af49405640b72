"""The VAE stage: train a KL autoencoder on bucketed pixel batches.

Loss per step: LDM's recipe (`training/vae_loss.py`): reconstruction + optional LPIPS + KL, plus,
from `disc_start`, an adaptively weighted PatchGAN hinge term ramped in over `disc_ramp` steps.
The discriminator itself trains from `disc_warmup` steps earlier, so it is not a random judge
when its verdict starts to count.
At the end the EMA weights are exported to `RUN_DIR/vae/` in the diffusers layout, with
`scaling_factor` and `shift_factor` measured so that normalised latents have unit variance; an
earlier export holding another VAE (a DiT may be trained on it) is kept as `vae-<fingerprint>`.

With `vae.init` the run fine-tunes an existing VAE: its architecture comes from the weights, so
the config's architecture keys must agree with it (they are refused otherwise, never ignored),
while the config's usage settings (`sample_size`, the tile size) replace the loaded VAE's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bucketing import BatchSchedule
from inference.metrics import psnr, ssim
from models.discriminator import PatchDiscriminator, hinge_d_loss, share_batch_statistics
from models.inception import InceptionFeatures
from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import load_vae, save_vae, state_dict_problems
from training.checkpoint import Checkpoint, load_checkpoint, read_state, resolve_resume
from training.config import Config, ConfigError, resolve_path, validate_config
from training.distributed import DistInfo, all_reduce_mean, setup, teardown
from training.images import to_unit_range
from training.logging import RunLogger
from training.loop import EMA, Batch, StageSteps, average_gradients, train_loop
from training.plan import DataPlan, eval_crops, pixel_loader, plan_data
from training.quality import ReconstructionFID, open_inception, vae_quality
from training.resume import (data_state, find_resume, load_optimizer, prepare_run_dir,
                             refuse_finished, resume_position)
from training.runtime import (autocast_dtype, close_loader, keep_freed_memory,
                              seed_everything, set_threads)
from training.vae_loss import autoencoder_loss, gan_ramp

# the loss terms logged beside the loop's loss/train (their weighted sum)
LOGGED_TERMS = ("loss/rec", "loss/perceptual", "loss/kl", "loss/gan_generator", "loss/disc",
                "loss_gan/adaptive_weight", "loss_gan/logits_real", "loss_gan/logits_fake")
SCALE_CHUNK = 8  # images encoded at once when measuring the latent scale (a fixed noise order)
# Adam (β1, β2) of the autoencoder and of the discriminator: LDM's autoencoder recipe, whose
# low β1 (less momentum) is the usual choice for adversarial training.
ADAM_BETAS = (0.5, 0.9)
# The keys of the config's `vae` section that fix the VAE's architecture (VAEConfig fields).
ARCH_KEYS = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
             "mid_block_add_attention", "use_quant_conv")
# VAEConfig fields the weights do not depend on: how the VAE is used, not what it is.
USAGE_FIELDS = ("sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
                "force_upcast")


def vae_architecture(config: VAEConfig) -> dict[str, Any]:
    """The fields of `config` that its weights depend on (all but `USAGE_FIELDS`), as JSON data."""
    return {k: v for k, v in config.to_dict().items() if k not in USAGE_FIELDS}


def build_vae(cfg: Config, check_keys: bool = True) -> AutoencoderKL:
    """A fresh VAE from the config's architecture, or the VAE named by `vae.init` with the
    config's `sample_size` (the tile size).

    `vae.init`'s architecture comes from its weights; a config whose architecture keys differ
    from it is refused (ConfigError naming each key and both values), since its saved copy
    would describe another model than the one trained. A key left at its default counts as
    set: a config with `vae.init` spells out the architecture of the VAE it names.
    `check_keys=False` skips that check, for the configs of checkpoints written before it
    existed (their weights are checked against the model instead: `check_resume_compatible`).
    """
    v = cfg.vae
    if not v.init:
        try:
            return AutoencoderKL(VAEConfig(
                latent_channels=v.latent_channels, block_out_channels=tuple(v.block_out_channels),
                layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                mid_block_add_attention=v.mid_block_add_attention,
                use_quant_conv=v.use_quant_conv, use_post_quant_conv=v.use_quant_conv,
                sample_size=v.sample_size, scaling_factor=1.0, shift_factor=0.0,
                force_upcast=False))
        except ValueError as err:
            raise ConfigError(f"vae: {err}") from None
    path = resolve_path(v.init)
    vae = load_vae(path).float().train()
    values = {k: (json.dumps(getattr(v, k)), json.dumps(getattr(vae.config, k)))
              for k in ARCH_KEYS}  # as the config file spells them (tuples as lists)
    conflicts = [f"vae.{k} is {ours} in the config, {theirs} in the VAE"
                 for k, (ours, theirs) in values.items() if ours != theirs and check_keys]
    if conflicts:
        raise ConfigError(f"{path}: vae.init names a VAE of another architecture than the "
                          f"config's: {'; '.join(conflicts)} (set these keys to the VAE's values: "
                          "fine-tuning keeps its architecture)")
    try:  # the model reads its tile size from its config on every tiled call
        vae.config = dataclasses.replace(vae.config, sample_size=v.sample_size)
    except ValueError as err:
        raise ConfigError(f"vae.sample_size {v.sample_size} does not suit {path}: {err}") from None
    return vae


@torch.no_grad()
def evaluate(model: AutoencoderKL, images: torch.Tensor, device: torch.device,
             batch: int = 8) -> tuple[float, float, torch.Tensor]:
    """Mean PSNR and SSIM of the posterior-mean reconstructions of uint8 `images`
    (N, 3, H, W), and the reconstructions (N, 3, H, W) in [-1, 1] on the CPU."""
    was_training = model.training
    model.eval()
    scores_p, scores_s, recs = [], [], []
    for i in range(0, len(images), batch):
        x = to_unit_range(images[i:i + batch].to(device))
        rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
        scores_p.append(psnr(rec, x))
        scores_s.append(ssim(rec, x))
        recs.append(rec.cpu())
    model.train(was_training)
    return float(torch.cat(scores_p).mean()), float(torch.cat(scores_s).mean()), torch.cat(recs)


def log_held_out(model: AutoencoderKL, images: torch.Tensor, device: torch.device,
                 rfid: ReconstructionFID | None, logger: RunLogger, step: int) -> None:
    """Log (and print) `val/psnr` and `val/ssim` of `model`'s reconstructions of uint8
    `images` (N, 3, H, W), and with `rfid` their `quality/rfid`, at `step`."""
    p, s, rec = evaluate(model, images, device)
    values = {"val/psnr": p, "val/ssim": s}
    if rfid is not None:
        values["quality/rfid"] = rfid(rec)
    logger.scalars(values, step)
    tqdm.write(f"step {step}: held-out PSNR {p:.2f} dB, SSIM {s:.4f}"
               + (f", rFID {values['quality/rfid']:.2f}" if rfid else ""))


@torch.no_grad()
def measure_latent_scale(model: AutoencoderKL, loader: torch.utils.data.DataLoader,
                         device: torch.device, images: int) -> tuple[float, float]:
    """(shift, scale) so that (latent − shift) × scale has zero mean and unit variance.

    Measured on posterior samples, as the DiT trains on, with fixed noise: exporting the same
    checkpoint twice gives the same factors, hence the same VAE fingerprint.
    """
    was_training = model.training
    model.eval()
    total, total_sq, count = 0.0, 0.0, 0
    gen = torch.Generator().manual_seed(0)
    batches = iter(loader)
    try:
        chunks = (pixels for batch in batches for pixels in batch["pixels"].split(SCALE_CHUNK))
        for pixels in chunks:  # (<= SCALE_CHUNK, 3, H, W) uint8
            # posterior samples (<= SCALE_CHUNK, C, H/f, W/f), f = model.downsample_factor
            z = model.encode(to_unit_range(pixels.to(device))).sample(gen).double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), \
                count + z.numel()
            images -= len(z)
            if images <= 0:
                break
    finally:
        close_loader(batches)
    model.train(was_training)
    mean = total / count
    std = max((total_sq / count - mean ** 2) ** 0.5, 1e-6)
    return mean, 1.0 / std


def check_resume_compatible(vae: AutoencoderKL, ckpt: Checkpoint) -> None:
    """Refuse (ConfigError) a checkpoint that does not hold a model of `vae`'s architecture.

    Compared: the architecture the checkpoint recorded of the model it trained (checkpoints
    written before it was recorded: its config's architecture keys, unless that config had
    `vae.init`, whose weights those keys did not then describe), and the shapes of its weights.
    """
    saved = ckpt.state.get("config", {})
    saved_vae = saved.get("vae", {})
    theirs = ckpt.state.get("vae_architecture")
    if theirs is None:  # written before the architecture was recorded
        theirs = {} if saved_vae.get("init") else {k: saved_vae.get(k) for k in ARCH_KEYS}
    ours = vae_architecture(vae.config)
    diff = [f"{k} {theirs[k]!r} -> {ours.get(k)!r}" for k in theirs if theirs[k] != ours.get(k)]
    if saved.get("stage") == "vae" and "model" in ckpt.tensors:
        diff += [f"weights: {p}" for p in state_dict_problems(vae, ckpt.tensors["model"])]
    if saved.get("stage") != "vae" or diff:
        raise ConfigError(f"{ckpt.path}: checkpoint is of another model (stage "
                          f"{saved.get('stage')!r}, differing: {'; '.join(diff) or '-'})")


def train_vae(cfg: Config, resume: str | None = None) -> Path:
    """Run the VAE stage; returns the run folder. A signal that stops it before
    `train.max_steps` raises `TrainingStopped` once the checkpoint is saved."""
    validate_config(cfg)  # also when called from Python, not train.py
    info: DistInfo = setup(cfg.train.device)
    threads = torch.get_num_threads()  # the stage sets its own (`set_threads`)
    try:
        return _train(cfg, resume, info)
    finally:
        torch.set_num_threads(threads)
        teardown()


def _train(cfg: Config, resume: str | None, info: DistInfo) -> Path:
    """`train_vae` once the process group is set up: the stage's setup, then `train_loop`."""
    t, v = cfg.train, cfg.vae
    device, main = info.device, info.is_main
    if t.grad_accum != 1:  # one batch per step: the GAN and adaptive weight see whole batches
        raise ConfigError(f"train.grad_accum {t.grad_accum}: the VAE stage takes one batch per "
                          "optimizer step; raise batch_size (or use more processes) instead")
    dit_only = [f"train.{k}" for k in ("compile", "grad_checkpointing") if getattr(t, k)]
    if dit_only:
        raise ConfigError(f"{', '.join(dit_only)}: the DiT stage's; the VAE stage would ignore "
                          "them")
    inception = open_inception(cfg, info)  # a bad file is refused before any work
    seed_everything(cfg.seed)
    set_threads(cfg.train.threads, cfg.data.num_workers, main)
    keep_freed_memory()  # no page faults re-zeroing activations every step
    resume_path = find_resume(cfg, resume, info.world_size)
    plan = plan_data(cfg, info)

    recorded = resume_path is None or "vae_architecture" in read_state(resume_path)
    vae = build_vae(cfg, check_keys=recorded).to(device)
    disc = PatchDiscriminator(3, v.disc_channels, v.disc_layers).to(device)
    disc = share_batch_statistics(disc, device, info.world_size)
    opt_g = torch.optim.Adam(vae.parameters(), lr=t.lr, betas=ADAM_BETAS,
                             weight_decay=t.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=v.disc_lr, betas=ADAM_BETAS)
    ema = EMA(vae, t.ema_decay)
    step, epoch, index = 0, 0, 0
    if resume_path is not None:  # refuse another model before anything is written
        ckpt = load_checkpoint(resume_path)
        check_resume_compatible(vae, ckpt)
        vae.load_state_dict(ckpt.group("model"))
        disc.load_state_dict(ckpt.group("discriminator"))
        ema.load_state_dict(ckpt.group("ema"), ckpt.state["ema_updates"])
        load_optimizer(opt_g, ckpt.torch_state["opt_g"])
        load_optimizer(opt_d, ckpt.torch_state["opt_d"])
        step = ckpt.step
        epoch, index = resume_position(ckpt.state, plan, resume_path, main)
        refuse_finished(resume_path, step, t.max_steps)
    run_dir = prepare_run_dir(cfg, resume_path, info, plan)
    if main and resume_path is not None:  # once nothing is left to refuse it
        print(f"resumed from {resume_path} at step {step}", flush=True)
    if main:
        n = sum(p.numel() for p in vae.parameters())
        print(f"VAE: {n / 1e6:.2f}M parameters, downsampling {vae.downsample_factor}, "
              f"{vae.config.latent_channels} latent channels", flush=True)

    loader = pixel_loader(cfg, plan, info, epoch, index, random_crop=cfg.data.random_crop)
    ema_model = copy.deepcopy(vae).eval()
    logger = RunLogger(run_dir, main, resumed_step=step if resume_path is not None else None)
    steps = vae_steps(cfg, info, vae, disc, ema, ema_model, opt_g, opt_d, plan, logger, step,
                      inception)
    batches = iter(loader)
    try:
        train_loop(cfg, info, run_dir, step, _batches(batches), steps, vae, opt_g, ema, logger,
                   cfg.batch_size * info.world_size)
    finally:  # also when the loop raised (see `close_loader`)
        close_loader(batches)
    if main:  # trained to the end (a stop at the last step included)
        export_vae(vae, ema, ema_model, loader_for_scale(cfg, plan, info, info.world_size),
                   device, run_dir / "vae", v.scale_images)
    logger.close()
    return run_dir


def _batches(loader: Iterator[dict]) -> Iterator[Batch]:
    """The pixel loader's batches as the loop's: uint8 pixels (B, 3, H, W) on the CPU."""
    for batch in loader:
        yield Batch(batch["pixels"], batch["index"].tolist(),
                    (int(batch["epoch"][0]), int(batch["batch_index"][0]) + 1))


def load_lpips(cfg: Config, device: torch.device) -> torch.nn.Module | None:
    """The LPIPS network of `vae.lpips_vgg` and `vae.lpips_lin`, None without them."""
    v = cfg.vae
    if not (v.lpips_vgg and v.lpips_lin):
        return None
    from training.lpips import LPIPS

    return LPIPS.from_files(resolve_path(v.lpips_vgg), resolve_path(v.lpips_lin)).to(device)


def vae_steps(cfg: Config, info: DistInfo, vae: AutoencoderKL, disc: torch.nn.Module,
              ema: EMA, ema_model: AutoencoderKL, opt_g: torch.optim.Optimizer,
              opt_d: torch.optim.Optimizer, plan: DataPlan, logger: RunLogger,
              step: int, inception: InceptionFeatures | None) -> StageSteps:
    """The VAE stage's part of each step (`training/loop.py`): the autoencoder loss of a batch,
    then the EMA and the discriminator's own step, the loss terms for the log, held-out PSNR,
    SSIM and rFID (with `inception`), reconstruction grids, and what a checkpoint holds."""
    v, device = cfg.vae, info.device
    amp = autocast_dtype(cfg.train.precision, device)
    lpips = load_lpips(cfg, device)
    eval_images = (eval_crops(plan.eval_records, v.eval_crop, v.eval_images,
                              cfg.data.max_image_pixels) if info.is_main else None)
    rfid = vae_quality(inception, eval_images, info)
    zero = torch.zeros((), device=device)
    now = {"step": step}  # the step being trained, and its tensors the later functions read

    def loss(pixels: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (a quarter of float32's bytes) and is converted there
        x = to_unit_range(pixels.to(device, non_blocking=True))  # (B, 3, H, W)
        ramp = gan_ramp(now["step"], v.disc_start, v.disc_ramp)  # of the GAN term
        # The posterior noise is drawn for the global batch and each rank keeps its slice, so
        # the run does not depend on how its batch is split across processes (world size × the
        # draws: negligible next to the autoencoder). One seed per (run seed, step); two pairs
        # share one only for steps over a million apart (1_000_003 and 97 are primes).
        noise_gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + now["step"] * 97)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            posterior = vae.encode(x)
            # (B, C, H/f, W/f), f = vae.downsample_factor
            z = posterior.sample(noise_gen, (info.rank, info.world_size))
            rec = vae.decode(z)  # (B, 3, H, W)
            terms = autoencoder_loss(x, rec, posterior, v, ramp, disc, lpips,
                                     vae.decoder.conv_out.weight)
        now.update(x=x, rec=rec, terms=terms, ramp=ramp, d_loss=zero, real=zero, fake=zero)
        return terms.total

    def update(finite: bool) -> None:  # after the loop's EMA update: the discriminator's step
        if now["step"] >= v.disc_start - v.disc_warmup and finite:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                # per-patch logits, (B, 1, h', w') each with h' ≈ H / 2**disc_layers, w' alike
                real, fake = disc(now["x"]), disc(now["rec"].detach())
                d_loss = hinge_d_loss(real, fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            average_gradients(list(disc.parameters()))
            opt_d.step()
            now.update(d_loss=d_loss, real=real.detach().mean(), fake=fake.detach().mean())
        now["step"] += 1

    def scalars() -> dict[str, float]:
        # On every rank: the terms' means over the global batch (one all-reduce).
        terms = now["terms"]
        values = all_reduce_mean(torch.stack([
            terms.rec, terms.perceptual, terms.kl, terms.gan, now["d_loss"], terms.gan_weight,
            now["real"], now["fake"]]).detach().float()).tolist()
        return {**dict(zip(LOGGED_TERMS, values)), "loss_gan/ramp": now["ramp"]}

    def payload() -> tuple[dict, dict, dict]:
        return ({"model": vae.state_dict(), "ema": ema.state_dict(),
                 "discriminator": disc.state_dict()},
                {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()},
                {"stage": "vae", "ema_updates": ema.num_updates,
                 "vae_architecture": vae_architecture(vae.config), **data_state(plan)})

    def validate(step: int) -> None:
        if len(eval_images):
            ema.copy_to(ema_model)
            log_held_out(ema_model, eval_images, device, rfid, logger, step)

    def preview(step: int, stop_requested: Callable[[], bool]) -> None:
        if len(eval_images):
            from inference.pipelines import image_grid

            ema.copy_to(ema_model)
            _, _, rec = evaluate(ema_model, eval_images[:4], device)
            # originals and reconstructions side by side, (8, 3, H, W)
            pairs = torch.stack([to_unit_range(eval_images[:4]), rec], 1).flatten(0, 1)
            logger.image("val/reconstructions", (image_grid(pairs, cols=2) + 1) / 2, step)

    return StageSteps(loss, update, scalars, payload, validate, preview,
                      lambda samples: [plan.records.path(i) for i in samples])


def loader_for_scale(cfg: Config, plan: DataPlan, info: DistInfo,
                     world_size: int) -> torch.utils.data.DataLoader:
    """Centre-cropped whole global batches (batch_size × world_size) of the run's schedule for
    this process alone, to measure the latent scale on: the same images, hence the same factors,
    at the end of training under torchrun as from `train.py --export` in one process."""
    whole = BatchSchedule(plan.placements.bucket, cfg.batch_size * world_size, 1,
                          cfg.seed)
    return pixel_loader(cfg, dataclasses.replace(plan, schedule=whole), info, 0, 0)


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Export the EMA weights of a VAE checkpoint (or a run's newest) to `out` (default
    `RUN_DIR/vae`), measuring the latent scale on the run's training data."""
    from training.config import from_dict

    path = resolve_resume(resolve_path(checkpoint))
    ckpt = load_checkpoint(path)
    cfg = from_dict(Config, ckpt.state["config"])
    if cfg.stage != "vae":
        raise ConfigError(f"{path}: not a VAE checkpoint (stage {cfg.stage!r})")
    info = setup("cpu" if cfg.train.device == "auto" and not torch.cuda.is_available()
                 else cfg.train.device)
    plan = plan_data(cfg, info)
    vae = build_vae(cfg, check_keys="vae_architecture" in ckpt.state).to(info.device)
    check_resume_compatible(vae, ckpt)
    vae.load_state_dict(ckpt.group("model"))
    ema = EMA(vae, cfg.train.ema_decay)
    ema.load_state_dict(ckpt.group("ema"), ckpt.state["ema_updates"])
    folder = Path(out) if out else path.parent.parent / "vae"
    scale_data = loader_for_scale(cfg, plan, info, int(ckpt.state.get("world_size", 1)))
    return export_vae(vae, ema, copy.deepcopy(vae), scale_data, info.device, folder,
                      cfg.vae.scale_images)


def export_vae(vae: AutoencoderKL, ema: EMA, ema_model: AutoencoderKL,
               loader: torch.utils.data.DataLoader, device: torch.device, folder: Path,
               images: int) -> Path:
    """Write the EMA weights in the diffusers layout with measured scale and shift as `folder`.

    `save_vae` replaces an earlier export there whole, keeping it as
    `kept_vae_folder(folder, its fingerprint)` when it is another VAE; the same VAE exported
    again (the measured factors are deterministic) just replaces it.
    """
    ema.copy_to(ema_model)
    print(f"exporting the VAE: measuring its latent scale on {images} images", flush=True)
    shift, scale = measure_latent_scale(ema_model, loader, device, images)
    # measured on raw latents: they replace any per-channel statistics a `vae.init` came with
    ema_model.config = dataclasses.replace(ema_model.config, shift_factor=round(shift, 6),
                                           scaling_factor=round(scale, 6), latents_mean=None,
                                           latents_std=None)
    out = save_vae(ema_model, folder, overwrite=True)
    print(f"exported {folder} (scaling_factor {scale:.4f}, shift_factor {shift:.4f})", flush=True)
    return out
