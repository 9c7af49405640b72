"""Tests for models/vae_weights.py: diffusers folders and original LDM / SGM / FLUX single files
load with diffusers' outputs, saved folders load in diffusers, and a replaced VAE is never lost.

Small random models on CPU, no network; the configs and model builders are test_vae.py's.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import save_file

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import (
    _infer_config,
    _ldm_key_to_diffusers,
    _to_diffusers_layout,
    kept_vae_folder,
    load_vae,
    save_vae,
    vae_fingerprint,
)
from tests.models.test_vae import (
    FLUX_LIKE,
    PLAYGROUND_LIKE,
    PLAYGROUND_MEAN,
    PLAYGROUND_STD,
    SD_LIKE,
    _diffusers_kwargs,
    _diffusers_vae,
    _images,
    _our_vae,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

# Like SD_LIKE and FLUX_LIKE, widths are multiples of 32: the group count single files infer.
NO_ATTENTION = VAEConfig(
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    sample_size=64,
    mid_block_add_attention=False,
)
SINGLE_FILE_CONFIGS = [SD_LIKE, FLUX_LIKE, NO_ATTENTION]
# Diffusers folders carry their config, so any GroupNorm count works there.
GROUPS_4 = VAEConfig(
    block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, sample_size=32
)
FOLDER_CONFIGS = [*SINGLE_FILE_CONFIGS, GROUPS_4]
IDS = ["sd-like", "flux-like", "no-attention", "groups-4"]

ARCHITECTURE_FIELDS = [
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
]


@torch.no_grad()
def _assert_same_outputs(ours: AutoencoderKL, peer: DiffusersAutoencoderKL) -> None:
    x = _images(ours.config)
    posterior = ours.encode(x)
    expected = peer.encode(x).latent_dist
    torch.testing.assert_close(posterior.mean, expected.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, expected.logvar, atol=1e-4, rtol=0)
    decoded = ours.decode(posterior.mean)
    torch.testing.assert_close(decoded, peer.decode(expected.mean).sample, atol=1e-4, rtol=0)


def _ldm_key(key: str, levels: int) -> str:
    """Inverse of the loader's renaming: diffusers name -> original LDM name."""
    match = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key)
    if match:
        inner = f"block.{match.group(3)}." if match.group(3) else "upsample."
        key = f"decoder.up.{levels - 1 - int(match.group(1))}.{inner}{key[match.end():]}"
    for pattern, replacement in [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]:
        key = re.sub(pattern, replacement, key)
    return key


def _ldm_state_dict(peer: DiffusersAutoencoderKL, prefix: str = "") -> dict[str, torch.Tensor]:
    """The peer's weights in the original layout, attention linears as 1x1 conv weights."""
    levels = len(peer.config.block_out_channels)
    state = {}
    for key, value in peer.state_dict().items():  # meta tensors work too
        new_key = _ldm_key(key, levels)
        if ".attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        state[prefix + new_key] = value.clone()
    return state


def test_vae_weights_sd_layout_matches_diffusers_names_and_shapes():
    with torch.device("meta"):  # full SD size, no memory
        ours = AutoencoderKL(VAEConfig())
        peer = DiffusersAutoencoderKL(**_diffusers_kwargs(VAEConfig()))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert len(shapes) == 248
    assert shapes == {k: v.shape for k, v in peer.state_dict().items()}
    # All 248 keys survive the trip to the LDM layout and back; the SD config is inferred.
    converted = _to_diffusers_layout(_ldm_state_dict(peer), Path("sd.safetensors"))
    assert {k: v.shape for k, v in converted.items()} == shapes
    with pytest.warns(UserWarning, match="guesses"):
        assert _infer_config(converted, Path("sd.safetensors")) == VAEConfig()


def test_vae_weights_ldm_key_names_match_reference_table():
    # A few rows of the SD-layout mapping (LDM name -> diffusers name), four levels.
    rows = {
        "encoder.down.1.block.0.nin_shortcut.weight":
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down.2.downsample.conv.bias": "encoder.down_blocks.2.downsamplers.0.conv.bias",
        "encoder.mid.attn_1.proj_out.weight": "encoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.mid.block_2.norm1.bias": "decoder.mid_block.resnets.1.norm1.bias",
        "decoder.mid.attn_1.norm.weight": "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up.0.block.2.conv2.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.norm_out.bias": "decoder.conv_norm_out.bias",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    assert {k: _ldm_key_to_diffusers(k, 4) for k in rows} == rows


@pytest.mark.parametrize("config", FOLDER_CONFIGS, ids=IDS)
def test_vae_weights_loads_diffusers_folder_with_same_outputs(tmp_path, config):
    peer = _diffusers_vae(config)
    peer.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.config == config
    _assert_same_outputs(ours, peer)
    from_config_file = load_vae(tmp_path / "vae" / "config.json")
    assert vae_fingerprint(from_config_file) == vae_fingerprint(ours)


@pytest.mark.parametrize("config", SINGLE_FILE_CONFIGS, ids=IDS[:3])
def test_vae_weights_loads_ldm_single_files_with_same_outputs(tmp_path, config):
    peer = _diffusers_vae(config)
    state = _ldm_state_dict(peer, prefix="first_stage_model.")
    state["loss.logvar"] = torch.zeros(())
    state["model.diffusion_model.out.weight"] = torch.zeros(4)  # another model in the checkpoint
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")

    for name in ("model.safetensors", "model.ckpt"):
        with pytest.warns(UserWarning, match="guesses"):
            ours = load_vae(tmp_path / name)
        for field in ARCHITECTURE_FIELDS:
            assert getattr(ours.config, field) == getattr(config, field), (name, field)
        _assert_same_outputs(ours, peer)


def test_vae_weights_single_file_warns_of_guessed_groups_scale_and_shift(tmp_path):
    save_file(_ldm_state_dict(_diffusers_vae(SD_LIKE)), tmp_path / "sd.safetensors")
    save_file(_ldm_state_dict(_diffusers_vae(FLUX_LIKE), "vae."), tmp_path / "flux.safetensors")
    guessed = "these are guesses: norm_num_groups 32, scaling_factor {} and shift_factor {} ({};"
    with pytest.warns(UserWarning, match=re.escape(guessed.format(0.18215, None, "SD 1.x"))):
        sd = load_vae(tmp_path / "sd.safetensors")
    assert (sd.config.scaling_factor, sd.config.shift_factor) == (0.18215, None)
    with pytest.warns(UserWarning, match=re.escape(guessed.format(0.3611, 0.1159, "FLUX.1"))):
        flux = load_vae(tmp_path / "flux.safetensors")
    assert (flux.config.scaling_factor, flux.config.shift_factor) == (0.3611, 0.1159)
    with pytest.warns(UserWarning, match=r"guesses: norm_num_groups 32; put") as caught:
        sd3 = load_vae(tmp_path / "flux.safetensors", scaling_factor=1.5305, shift_factor=0.0609)
    assert (sd3.config.scaling_factor, sd3.config.shift_factor) == (1.5305, 0.0609)
    assert len(caught) == 1 and str(tmp_path / "flux.safetensors") in str(caught[0].message)


def test_vae_weights_loads_stability_file_with_ema_bookkeeping(tmp_path):
    # vae-ft-mse-840000-ema-pruned and its kin: LDM layout plus two scalar EMA counters.
    peer = _diffusers_vae(SD_LIKE)
    state = _ldm_state_dict(peer)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(840000, dtype=torch.int32)
    save_file(state, tmp_path / "vae-ft-mse.safetensors")
    torch.save({"state_dict": state}, tmp_path / "vae-ft-mse.ckpt")
    for name in ("vae-ft-mse.safetensors", "vae-ft-mse.ckpt"):
        with pytest.warns(UserWarning, match="guesses"):
            _assert_same_outputs(load_vae(tmp_path / name), peer)


def test_vae_weights_single_file_takes_the_diffusers_config_beside_it(tmp_path, recwarn):
    config = dataclasses.replace(GROUPS_4, scaling_factor=0.5, shift_factor=0.25)
    peer = _diffusers_vae(config)  # 4 GroupNorm groups: inference from widths would say 8
    peer.save_pretrained(tmp_path / "vae")
    save_file(_ldm_state_dict(peer), tmp_path / "vae" / "renamed_ldm.safetensors")
    for name in ("diffusion_pytorch_model.safetensors", "renamed_ldm.safetensors"):
        ours = load_vae(tmp_path / "vae" / name)
        assert ours.config == config, name
        _assert_same_outputs(ours, peer)
    assert not recwarn.list  # nothing guessed
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"format": "dit-export"}))
    with pytest.warns(UserWarning, match="norm_num_groups 8"):  # not a VAE config: inferred
        assert load_vae(tmp_path / "vae" / "renamed_ldm.safetensors").config != config


def test_vae_weights_loads_old_attention_names_from_bin(tmp_path):
    peer = _diffusers_vae(SD_LIKE)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in peer.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = value
    assert any(".query." in k for k in state)
    (tmp_path / "config.json").write_text(json.dumps(SD_LIKE.to_diffusers_dict()))
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    _assert_same_outputs(load_vae(tmp_path), peer)


@pytest.mark.parametrize("config", [SD_LIKE, FLUX_LIKE], ids=IDS[:2])
def test_vae_weights_save_vae_loads_in_diffusers(tmp_path, config, assert_shared_mode):
    ours = _our_vae(config)
    save_vae(ours, tmp_path / "out")
    assert_shared_mode(*(tmp_path / "out").iterdir())
    peer = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert peer.config.scaling_factor == config.scaling_factor
    assert peer.config.shift_factor == config.shift_factor
    _assert_same_outputs(ours, peer)
    with pytest.raises(FileExistsError, match="config.json"):
        save_vae(ours, tmp_path / "out")
    save_vae(ours, tmp_path / "out", overwrite=True)


def test_vae_weights_save_vae_overwrites_only_a_vae(tmp_path):
    other = tmp_path / "dit_export"  # another model's export: config.json + weights
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "dit-export", "step": 7}))
    save_file({"final.weight": torch.zeros(2)}, other / "diffusion_pytorch_model.safetensors")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ValueError, match=re.escape(str(other)) + ".*not a VAE folder"):
        save_vae(_our_vae(SD_LIKE), other, overwrite=True)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    notes = tmp_path / "notes"  # no config.json at all
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(notes)) + ".*not a VAE folder"):
        save_vae(_our_vae(SD_LIKE), notes, overwrite=True)
    broken = tmp_path / "broken"  # a VAE config without its weights: no fingerprint to keep it by
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(SD_LIKE.to_diffusers_dict()))
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*no loadable VAE"):
        save_vae(_our_vae(SD_LIKE), broken, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "dit_export", "notes"]
    assert (notes / "notes.txt").read_text() == "keep me"
    assert [p.name for p in broken.iterdir()] == ["config.json"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_vae_weights_save_vae_keeps_an_earlier_vae_it_replaces(tmp_path, capsys):
    a, b = _our_vae(GROUPS_4, seed=0), _our_vae(GROUPS_4, seed=1)
    out = tmp_path / "vae"
    written_a = _files(save_vae(a, out))
    fp_a = vae_fingerprint(load_vae(out))
    save_vae(b, out, overwrite=True)
    kept_a = kept_vae_folder(out, fp_a)
    assert kept_a == tmp_path / f"vae-{fp_a[:12]}" and _files(kept_a) == written_a
    assert vae_fingerprint(load_vae(out)) == vae_fingerprint(b)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith(f"kept it in {kept_a}")
    written_b, fp_b = _files(out), vae_fingerprint(b)
    save_vae(b, out, overwrite=True)  # the same VAE again: replaced in place, nothing kept
    assert _files(out) == written_b and sorted(tmp_path.iterdir()) == [out, kept_a]
    assert capsys.readouterr().out == ""
    save_vae(a, out, overwrite=True)  # b is kept in its turn
    assert _files(kept_vae_folder(out, fp_b)) == written_b and _files(out) == written_a
    save_vae(b, out, overwrite=True)  # a is kept already under its name: simply replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vae", f"vae-{fp_a[:12]}", f"vae-{fp_b[:12]}"])
    assert _files(out) == written_b and _files(kept_a) == written_a


def test_vae_weights_save_vae_interrupted_replacement_leaves_each_vae_whole(tmp_path, monkeypatch):
    out, source = tmp_path / "vae", tmp_path / "source"
    written_a = _files(save_vae(_our_vae(GROUPS_4, seed=0), out))
    fp_a = vae_fingerprint(load_vae(out))
    fp_b = vae_fingerprint(load_vae(save_vae(_our_vae(GROUPS_4, seed=1), source)))
    rename = os.rename

    def failing_rename(src, dst):  # the new folder cannot take its place
        if Path(src).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        save_vae(load_vae(source), out, overwrite=True)
    monkeypatch.undo()
    assert _files(out) == written_a  # an error changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "vae"]
    # The process dies there instead: each VAE is whole under its own name, none is mixed.
    crash = (
        "import os, sys\n"
        "from models.vae_weights import load_vae, save_vae\n"
        "rename = os.rename\n"
        "def crash(src, dst):\n"
        "    if os.path.basename(src).startswith('.tmp-'):\n"
        "        os._exit(3)\n"
        "    rename(src, dst)\n"
        "os.rename = crash\n"
        "save_vae(load_vae(sys.argv[1]), sys.argv[2], overwrite=True)\n"
    )
    died = subprocess.run([sys.executable, "-c", crash, str(source), str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert died.returncode == 3, died.stderr[-2000:]
    assert not out.exists()
    assert _files(kept_vae_folder(out, fp_a)) == written_a
    (new,) = tmp_path.glob(".tmp-vae-*")
    assert vae_fingerprint(load_vae(new)) == fp_b


def test_vae_weights_load_keeps_fp32_weights_under_force_upcast(tmp_path):
    save_vae(_our_vae(SD_LIKE), tmp_path / "a")
    assert load_vae(tmp_path / "a", dtype=torch.bfloat16).encoder.conv_in.weight.dtype == (
        torch.float32
    )


def test_vae_weights_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_vae(missing)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(SD_LIKE.to_diffusers_dict()))
    with pytest.raises(FileNotFoundError, match=re.escape(str(no_weights))):
        load_vae(no_weights)

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"text_model.embeddings.weight": torch.zeros(2, 2)}, unrelated)
    with pytest.raises(ValueError, match=re.escape(str(unrelated))):
        load_vae(unrelated)

    mismatched = tmp_path / "mismatched"
    save_vae(_our_vae(SD_LIKE), mismatched)
    (mismatched / "config.json").write_text(json.dumps(FLUX_LIKE.to_diffusers_dict()))
    with pytest.raises(ValueError, match=re.escape(str(mismatched)) + ".*missing.*shape"):
        load_vae(mismatched)


def test_vae_weights_fingerprint_changes_with_one_weight():
    model = _our_vae(SD_LIKE)
    before = vae_fingerprint(model)
    assert vae_fingerprint(_our_vae(SD_LIKE)) == before
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-3
    assert vae_fingerprint(model) != before


def test_vae_weights_loads_diffusers_folder_with_latent_stats(tmp_path):
    peer = _diffusers_vae(PLAYGROUND_LIKE)  # diffusers writes config.json and the safetensors
    peer.save_pretrained(tmp_path / "vae")
    written = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert (written["latents_mean"], written["latents_std"]) == (PLAYGROUND_MEAN, PLAYGROUND_STD)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    ours = load_vae(tmp_path / "vae")
    assert ours.config == PLAYGROUND_LIKE
    assert (ours.config.latents_mean, ours.config.latents_std) == (PLAYGROUND_MEAN, PLAYGROUND_STD)
    _assert_same_outputs(ours, peer)
    # The statistics change the latents the DiT sees, so they are part of the fingerprint.
    assert vae_fingerprint(ours) != vae_fingerprint(_our_vae(dataclasses.replace(
        PLAYGROUND_LIKE, latents_mean=None, latents_std=None)))


def test_vae_weights_save_vae_round_trips_latent_stats(tmp_path):
    ours = _our_vae(PLAYGROUND_LIKE)
    save_vae(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["latents_mean"], written["latents_std"]) == (PLAYGROUND_MEAN, PLAYGROUND_STD)
    again = load_vae(tmp_path / "out")
    assert again.config == PLAYGROUND_LIKE
    assert vae_fingerprint(again) == vae_fingerprint(ours)
    peer = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out")
    assert list(peer.config.latents_mean) == PLAYGROUND_MEAN
    assert list(peer.config.latents_std) == PLAYGROUND_STD
    assert peer.config.scaling_factor == 0.5


def test_vae_weights_single_file_takes_latent_stats_overrides(tmp_path):
    peer = _diffusers_vae(FLUX_LIKE)  # the table guesses FLUX.1's shift for this layout
    save_file(_ldm_state_dict(peer), tmp_path / "ae.safetensors")
    mean, std = [0.1 * c for c in range(16)], [1.0 + 0.1 * c for c in range(16)]
    with pytest.warns(UserWarning, match=r"scaling_factor 0.3611 \(FLUX.1") as caught:
        ours = load_vae(tmp_path / "ae.safetensors", latents_mean=mean, latents_std=std)
    assert "shift_factor" not in str(caught[0].message)  # not guessed: the statistics replace it
    assert (ours.config.latents_mean, ours.config.latents_std) == (mean, std)
    assert ours.config.shift_factor is None
    _assert_same_outputs(ours, peer)
