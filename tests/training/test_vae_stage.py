"""The VAE training stage on real synthetic image files with a tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import load_vae, save_vae, vae_fingerprint
from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from training.config import Config, ConfigError, TrainingStopped, from_dict, save_config
from training.vae_stage import build_vae, export_checkpoint, train_vae
from tests.models.inception_file import random_inception_file
from tests.training.test_dit_stage import _scalars

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _cfg(run_dir: Path, **train) -> Config:
    return from_dict(Config, {
        "description": "tiny VAE for tests", "stage": "vae", "run_dir": str(run_dir),
        "seed": 1, "batch_size": 2,
        "data": {"dataset": "synthetic:12", "resolution": 32, "num_workers": 0, "holdout": 2},
        "train": {"max_steps": 1, "lr": 2e-3, "log_every": 1, "eval_every": 1000,
                  "ckpt_every": 1000, "sample_every": 1000, "precision": "fp32",
                  "device": "cpu", **train},
        "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "latent_channels": 4,
                "disc_start": 1, "disc_warmup": 1, "disc_ramp": 2, "disc_channels": 8,
                "disc_layers": 2, "eval_crop": 32, "eval_images": 2, "scale_images": 4},
    })


@pytest.mark.parametrize("device", [
    pytest.param({"device": "cpu"}, id="cpu"),
    pytest.param({"device": "cuda", "precision": "bf16"}, id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_vae_stage_one_mini_batch_smoke(tmp_path: Path, tmp_path_factory, device: dict) -> None:
    weights = random_inception_file(tmp_path_factory)  # rFID at the evaluation (the last step)
    run = train_vae(_cfg(tmp_path / "run", max_steps=2, inception=str(weights), **device))
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step_0000002"
    loaded = load_checkpoint(ckpt)
    assert set(loaded.tensors) == {"model", "ema", "discriminator"}
    assert set(loaded.torch_state) == {"opt_g", "opt_d"}
    assert json.loads((run / "config.json").read_text())["stage"] == "vae"
    rfid = _scalars(run, "quality/rfid")
    assert list(rfid) == [2] and rfid[2] >= 0
    vae = load_vae(run / "vae")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor > 0
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert vae.decode(vae.encode(x).mode()).shape == x.shape


def test_vae_stage_reconstruction_loss_falls(tmp_path: Path) -> None:
    """Training lowers the reconstruction error of the images it trains on: measured on the
    same centre crops before (the seeded initial weights) and after, as single batches are too
    few images (2) to tell a trend from which images they hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.images import to_unit_range
    from training.distributed import DistInfo
    from training.plan import eval_crops, plan_data
    from training.runtime import seed_everything

    cfg = _cfg(tmp_path / "run", max_steps=80, eval_every=80)
    cfg.vae.disc_start = 10_000  # reconstruction alone, to see it fall
    run = train_vae(cfg)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert len(events.Scalars("loss/rec")) == 80
    assert events.Scalars("val/psnr")[-1].value > 10
    seed_everything(cfg.seed)  # as the stage does before building its model
    initial = build_vae(cfg).eval()
    trained = build_vae(cfg).eval()
    trained.load_state_dict(load_checkpoint(latest_checkpoint(run)).group("model"))
    plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    x = to_unit_range(eval_crops(plan.records, 32, len(plan.records)))  # (N, 3, 32, 32)
    with torch.no_grad():
        before, after = ((vae.decode(vae.encode(x).mode()) - x).abs().mean().item()
                         for vae in (initial, trained))
    assert after < 0.7 * before, (before, after)


def test_vae_stage_loss_is_the_sum_of_its_logged_terms(tmp_path: Path) -> None:
    # loss = rec + perceptual_weight × LPIPS + kl_weight × KL / pixels + ramp × weight × GAN, with
    # KL summed over latent elements (models/vae.py: kl) against a per-pixel reconstruction
    # mean: the LDM balance. Step 1 is before disc_start, steps 2-3 ramp the GAN term in.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path / "run", max_steps=3)
    cfg.vae.kl_weight = 1.0  # large enough for the KL term to show in the sum
    run = train_vae(cfg)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    term = {tag: [e.value for e in events.Scalars(tag)] for tag in (
        "loss/train", "loss/rec", "loss/perceptual", "loss/kl", "loss/gan_generator",
        "loss_gan/adaptive_weight", "loss_gan/ramp")}
    assert term["loss_gan/ramp"] == [0.0, 0.5, 1.0] and term["loss/perceptual"] == [0.0] * 3
    pixels = 3 * 32 * 32
    for i in range(3):
        kl = cfg.vae.kl_weight * term["loss/kl"][i] / pixels
        gan = (term["loss_gan/ramp"][i] * term["loss_gan/adaptive_weight"][i]
               * term["loss/gan_generator"][i])
        assert kl > 0.01 * term["loss/train"][i] and (i == 0 or abs(gan) > 0)
        expected = term["loss/rec"][i] + kl + gan
        assert abs(term["loss/train"][i] - expected) < 1e-5 * abs(expected), (i, term)


def test_vae_stage_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight = train_vae(_cfg(tmp_path / "a", max_steps=4, ckpt_every=2))
    train_vae(_cfg(tmp_path / "b", max_steps=2, ckpt_every=2))
    resumed = train_vae(_cfg(tmp_path / "b", max_steps=4, ckpt_every=2), resume="")
    state = load_checkpoint(latest_checkpoint(resumed)).state  # what resume_position compares
    assert state["num_images"] == 10 and len(state["data_fingerprint"]) == 64
    for group in ("model", "ema", "discriminator"):
        a = load_file(straight / "checkpoints" / "step_0000004" / f"{group}.safetensors")
        b = load_file(resumed / "checkpoints" / "step_0000004" / f"{group}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (group, k)


def test_vae_stage_refuses_gradient_accumulation_and_dit_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.grad_accum 2: the VAE stage takes one batch"):
        train_vae(_cfg(tmp_path / "run", grad_accum=2))
    with pytest.raises(ConfigError, match="train.compile, train.grad_checkpointing: the DiT "
                       "stage's; the VAE stage would ignore them"):
        train_vae(_cfg(tmp_path / "run", compile=True, grad_checkpointing=True))
    assert not (tmp_path / "run").exists()


def test_vae_stage_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    train_vae(_cfg(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--resume"):
        train_vae(_cfg(tmp_path / "run"))


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "tb" not in p.parts}


@pytest.mark.parametrize("case", ["other_architecture", "missing_ema", "new_seed"])
def test_vae_stage_refused_resume_leaves_the_run_untouched(tmp_path: Path, case: str) -> None:
    run = train_vae(_cfg(tmp_path / "run"))
    other = _cfg(tmp_path / "run", max_steps=2)
    if case == "other_architecture":
        other.vae.latent_channels = 8
        error, expected = ConfigError, "another model"
    elif case == "missing_ema":
        (run / "checkpoints" / "step_0000001" / "ema.safetensors").unlink()
        error, expected = FileNotFoundError, r"step_0000001/ema\.safetensors: missing"
    else:  # the batch schedule would change under the saved position
        other.seed = 2
        error, expected = ConfigError, "seed 1 -> 2"
    before = _files(run)
    with pytest.raises(error, match=expected):
        train_vae(other, resume="")
    assert _files(run) == before  # config.json included


def _init_vae(folder: Path, latent_channels: int = 4, sample_size: int = 16,
              **stats) -> Path:
    """A VAE folder of `_cfg`'s architecture (unless `latent_channels` says otherwise)."""
    torch.manual_seed(0)
    return save_vae(AutoencoderKL(VAEConfig(
        block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        latent_channels=latent_channels, mid_block_add_attention=False, use_quant_conv=False,
        use_post_quant_conv=False, sample_size=sample_size, force_upcast=False, **stats)),
        folder)


def test_vae_stage_init_takes_the_configs_sample_size(tmp_path: Path) -> None:
    # The init also has per-channel latent statistics; the export's measured scalar scale and
    # shift replace them (they were measured on the raw latents).
    init = _init_vae(tmp_path / "init", sample_size=16, latents_mean=[0.0, 1.0, 0.0, -1.0],
                     latents_std=[1.0, 2.0, 3.0, 4.0])
    cfg = _cfg(tmp_path / "run")
    cfg.vae.init, cfg.vae.sample_size = str(init), 64
    vae, loaded = build_vae(cfg), load_vae(init)
    assert vae.config.sample_size == 64
    for k, v in loaded.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
    # the model tiles by the new size: a 64-px image is one tile, where the init used 16-px ones
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).mean  # (1, 4, 32, 32)
        assert torch.equal(vae.encode_tiled(x).mean, whole)
        assert not torch.allclose(loaded.encode_tiled(x).mean, whole)
    run = train_vae(cfg)
    exported = json.loads((run / "vae" / "config.json").read_text())
    assert exported["sample_size"] == 64
    assert "latents_mean" not in exported and "latents_std" not in exported
    assert load_vae(run / "vae").config.shift_factor == exported["shift_factor"] != 0
    assert json.loads((run / "config.json").read_text())["vae"]["sample_size"] == 64


def test_vae_stage_init_refuses_a_conflicting_architecture(tmp_path: Path) -> None:
    init = _init_vae(tmp_path / "init")
    cfg = _cfg(tmp_path / "run")
    cfg.vae.init, cfg.vae.latent_channels, cfg.vae.block_out_channels = str(init), 8, [8, 32]
    expected = (f"{init}: vae.init names a VAE of another architecture than the config's: "
                "vae.latent_channels is 8 in the config, 4 in the VAE; vae.block_out_channels "
                "is [8, 32] in the config, [8, 16] in the VAE (set these keys")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train_vae(cfg)
    assert not (tmp_path / "run").exists()
    cfg.vae.latent_channels, cfg.vae.block_out_channels = 4, [8, 16]
    cfg.vae.sample_size = 1  # below the downsampling factor 2
    with pytest.raises(ConfigError, match=re.escape(f"vae.sample_size 1 does not suit {init}")):
        train_vae(cfg)


@pytest.mark.parametrize("keys", ["unchanged", "set_to_the_new_init"])
def test_vae_stage_resume_refuses_an_init_of_another_architecture(tmp_path: Path,
                                                                  keys: str) -> None:
    cfg = _cfg(tmp_path / "run")
    cfg.vae.init = str(_init_vae(tmp_path / "a"))
    run = train_vae(cfg)
    other = _cfg(tmp_path / "run", max_steps=2)
    other.vae.init = str(_init_vae(tmp_path / "b", latent_channels=8))
    if keys == "unchanged":  # they conflict with the new init
        expected = "vae.latent_channels is 4 in the config, 8 in the VAE"
    else:  # they describe the new init, which is not the checkpoint's model
        other.vae.latent_channels = 8
        expected = "checkpoint is of another model .*latent_channels 4 -> 8; weights: "
    before = _files(run)
    with pytest.raises(ConfigError, match=expected):
        train_vae(other, resume="")
    assert _files(run) == before


def test_vae_stage_resumes_a_checkpoint_without_a_recorded_architecture(tmp_path: Path) -> None:
    """Checkpoints written before the architecture was recorded: an init run's config keys were
    not checked against the init then, so its weights alone say which model it holds."""
    init = _init_vae(tmp_path / "init")
    cfg = _cfg(tmp_path / "run")
    cfg.vae.init = str(init)
    run = train_vae(cfg)
    state_file = latest_checkpoint(run) / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("vae_architecture")["latent_channels"] == 4
    state["config"]["vae"]["latent_channels"] = 16  # a key that did not describe the init
    state_file.write_text(json.dumps(state))
    exported = export_checkpoint(run, tmp_path / "exported")  # with the config it holds
    assert load_vae(exported).config.latent_channels == 4
    saved = from_dict(Config, state["config"])
    saved.train.max_steps = 2
    train_vae(saved, resume="")
    assert load_checkpoint(latest_checkpoint(run)).state["vae_architecture"]["latent_channels"] == 4
    # step 1 again, with an init of 8 latent channels: its weights refuse it
    cfg = _cfg(run, max_steps=3)
    cfg.vae.init = str(_init_vae(tmp_path / "other", latent_channels=8))
    cfg.vae.latent_channels = 8
    with pytest.raises(ConfigError, match="another model .*differing: weights: .*wrongly shaped"):
        train_vae(cfg, resume=str(state_file.parent))


@pytest.mark.parametrize("max_steps", [1, 2])
def test_vae_stage_signal_stops_early_but_not_at_the_end(tmp_path: Path, monkeypatch,
                                                          max_steps: int) -> None:
    # A stop request every step (as if a signal had reached another rank): a run stopped before
    # max_steps raises TrainingStopped after saving; one stopped at its last step is finished,
    # so it exports its VAE and returns as usual.
    from training import loop

    real_agree = loop.agree
    monkeypatch.setattr(loop, "agree", lambda loss, stop: real_agree(loss, True))
    cfg = _cfg(tmp_path / "run", max_steps=max_steps)
    if max_steps == 1:
        assert train_vae(cfg) == tmp_path / "run"
        assert (tmp_path / "run" / "vae" / "config.json").is_file()
    else:
        with pytest.raises(TrainingStopped, match="signal on another process: saved step 1 and "
                           "stopped; `train.py --resume .*/run` continues it") as stopped:
            train_vae(cfg)
        assert stopped.value.signum == signal.SIGTERM
        assert not (tmp_path / "run" / "vae").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 1


def test_vae_stage_resume_refuses_another_runs_folder(tmp_path: Path, capsys) -> None:
    a = train_vae(_cfg(tmp_path / "a", max_steps=2, ckpt_every=1))
    b = train_vae(_cfg(tmp_path / "b", max_steps=2, keep_last=1))
    before = _files(b)
    capsys.readouterr()
    with pytest.raises(ConfigError, match="already holds checkpoints of another run"):
        train_vae(_cfg(b, max_steps=3, keep_last=1), resume=str(a / "checkpoints" / "step_0000001"))
    assert _files(b) == before
    assert "resumed from" not in capsys.readouterr().out  # refused: nothing was resumed
    # an empty folder takes a fork of the run
    fork = train_vae(_cfg(tmp_path / "fork", max_steps=3), resume=str(a))
    assert [p.name for p in list_checkpoints(fork)] == ["step_0000003"]
    assert [p.name for p in list_checkpoints(a)] == ["step_0000001", "step_0000002"]


def test_vae_stage_rollback_sets_newer_checkpoints_aside(tmp_path: Path) -> None:
    run = train_vae(_cfg(tmp_path / "run", max_steps=4, ckpt_every=1))
    before = _files(run / "checkpoints")
    # continue from step 2 on another branch (another learning rate)
    train_vae(_cfg(run, max_steps=3, ckpt_every=1, lr=1e-3),
              resume=str(run / "checkpoints" / "step_0000002"))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000003"]
    assert load_checkpoint(run).state["config"]["train"]["lr"] == 1e-3
    (aside,) = (run / "set_aside").iterdir()  # the abandoned branch, byte for byte
    assert _files(aside / "checkpoints") == {k: v for k, v in before.items()
                                             if not k.startswith("step_0000002")}


def test_vae_stage_resume_applies_new_optimizer_settings(tmp_path: Path) -> None:
    train_vae(_cfg(tmp_path / "run", max_steps=1))
    cfg = _cfg(tmp_path / "run", max_steps=2, weight_decay=0.05)
    cfg.vae.disc_lr = 3e-5
    run = train_vae(cfg, resume="")
    groups = load_checkpoint(run).torch_state
    assert groups["opt_g"]["param_groups"][0]["weight_decay"] == 0.05
    assert groups["opt_d"]["param_groups"][0]["lr"] == 3e-5


def test_vae_stage_export_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = train_vae(_cfg(tmp_path / "run"))
    out = export_checkpoint(run, tmp_path / "exported")
    vae = load_vae(out)
    ckpt = load_checkpoint(latest_checkpoint(run))
    for k, v in vae.state_dict().items():
        assert torch.equal(v, ckpt.tensors["ema"][k])
    # the same checkpoint exported again is the same VAE (measured factors included), so a DiT
    # trained on the first export still resumes with the second
    again = load_vae(export_checkpoint(run, tmp_path / "again"))
    assert again.config.scaling_factor == vae.config.scaling_factor
    assert again.config.shift_factor == vae.config.shift_factor
    assert vae_fingerprint(again) == vae_fingerprint(vae)
    # exported again to the same folder, it replaces itself: no earlier export to keep
    export_checkpoint(run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "exported", "run"]
    assert vae_fingerprint(load_vae(out)) == vae_fingerprint(vae)
    # --vae names a DiT run's VAE; a VAE run exports its own weights
    from train import main

    capsys.readouterr()
    assert main(["--export", str(run), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("exported")] == [
        f"exported {tmp_path / 'cli'} (scaling_factor {vae.config.scaling_factor:.4f}, "
        f"shift_factor {vae.config.shift_factor:.4f})"]  # one line, with the factors
    assert main(["--export", str(run), "--vae", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "a VAE run exports its own weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a folder that holds something other than a VAE is refused, untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "dit-export"}))
    with pytest.raises(ValueError, match=f"{re.escape(str(other))}: not a VAE folder"):
        export_checkpoint(run, other)
    assert [p.name for p in other.iterdir()] == ["config.json"]


def test_vae_stage_resumed_export_keeps_the_vae_a_dit_was_trained_on(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Train a VAE, a DiT on its export, then resume the VAE: the DiT's VAE is kept beside the
    new export, the DiT's resume names it, and `train.py --resume --vae KEPT` continues."""
    from training.dit_stage import train_dit

    run = train_vae(_cfg(tmp_path / "vae_run"))
    first = {p.name: p.read_bytes() for p in (run / "vae").iterdir()}
    trained_on = vae_fingerprint(load_vae(run / "vae"))
    dit_cfg = from_dict(Config, {
        "description": "tiny DiT on the VAE run's export", "stage": "dit",
        "run_dir": str(tmp_path / "dit_run"), "seed": 3, "batch_size": 2,
        "data": {"dataset": "synthetic:12", "resolution": 32, "num_workers": 0, "holdout": 2},
        "train": {"max_steps": 1, "log_every": 1, "eval_every": 1000, "sample_every": 1000,
                  "precision": "fp32", "device": "cpu"},
        "dit": {"model": "dit-t/2", "vae": str(run / "vae"), "sample_sizes": ["32x32"],
                "sample_steps": 1, "num_samples": 1}})
    dit_run = train_dit(dit_cfg)
    capsys.readouterr()
    train_vae(_cfg(run, max_steps=2), resume="")
    kept = run / f"vae-{trained_on[:12]}"
    assert f"kept it in {kept}" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("vae")) == ["vae", kept.name]
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == first
    assert vae_fingerprint(load_vae(run / "vae")) != trained_on
    dit_cfg.train.max_steps = 2
    with pytest.raises(ConfigError, match=re.escape(f"kept in {kept}: resume with --vae {kept})")):
        train_dit(dit_cfg, resume="")
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(dit_run), "--vae",
                              str(kept), "--max-steps", "2"], cwd=REPO_ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = load_checkpoint(latest_checkpoint(dit_run)).state
    assert state["step"] == 2 and state["vae_fingerprint"] == trained_on
    assert state["vae"] == str(kept)


def test_vae_stage_sigterm_to_process_group_saves_checkpoint(tmp_path: Path) -> None:
    """scancel, `timeout` and Ctrl-C signal the whole process group, data workers included:
    the workers must not die first and crash the loop before it saves its checkpoint."""
    cfg = _cfg(tmp_path / "run", max_steps=100_000)
    cfg.data.num_workers = 2
    save_config(cfg, tmp_path / "c.json")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(tmp_path / "c.json")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "run" / "tb").glob("events.out.tfevents.*")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        time.sleep(3)  # a few steps with the workers running
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]  # stopped early, not done
    assert "signal 15: saved step" in output
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and load_checkpoint(ckpt).step > 0


def test_vae_stage_error_in_a_loader_worker_ends_the_process(tmp_path: Path) -> None:
    # The loader's workers ignore SIGTERM (so a signal to the process group cannot kill them
    # before the checkpoint is saved). An error raised through the loader used to leave them
    # alive in its traceback, and Python's exit then waited for them forever.
    cfg = _cfg(tmp_path / "run", max_steps=100)
    cfg.data.num_workers = 2
    save_config(cfg, tmp_path / "c.json")
    script = (
        "import sys\n"
        "from training import data, vae_stage\n"
        "from training.config import load_config\n"
        "load = data.PixelDataset._pixels\n"
        "def fail(self, index, seed):\n"
        "    if seed % 3 == 0:\n"
        "        raise KeyError(f'broken sample {index}')\n"
        "    return load(self, index, seed)\n"
        "data.PixelDataset._pixels = fail  # inherited by the forked workers\n"
        f"vae_stage.train_vae(load_config({str(tmp_path / 'c.json')!r}))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "KeyError: 'broken sample" in out.stderr, out.stderr[-2000:]


def test_vae_stage_measured_scale_makes_latents_unit_normal() -> None:
    from models.vae import AutoencoderKL, VAEConfig
    from training.vae_stage import measure_latent_scale

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, sample_size=32, force_upcast=False))
    with torch.no_grad():
        vae.encoder.conv_out.bias.add_(3.0)  # latents far from N(0, 1)
    batches = [{"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    shift, scale = measure_latent_scale(vae, batches, torch.device("cpu"), 16)
    with torch.no_grad():
        z = torch.cat([vae.encode(b["pixels"].float() / 127.5 - 1).sample(
            torch.Generator().manual_seed(9)) for b in batches])
    normalised = (z - shift) * scale
    assert abs(normalised.mean().item()) < 0.1 and abs(normalised.std().item() - 1) < 0.1


def test_vae_stage_resume_with_nothing_left_to_train_is_refused(tmp_path: Path) -> None:
    run = train_vae(_cfg(tmp_path / "run", max_steps=1))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError, match=r"is at step 1, so train.max_steps 1 leaves nothing"):
        train_vae(_cfg(tmp_path / "run", max_steps=1), resume="")
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
