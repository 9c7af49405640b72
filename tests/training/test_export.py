"""Export of a DiT run (training/export.py): EMA weights, config and VAE reference that
inference loads to the same pixels as the run itself."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.pipelines import generate
from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import kept_vae_folder, save_vae, vae_fingerprint
from training.synthetic import FAMILIES
from training.export import ExportError, export_dit, export_name, is_export, load_generator

CLASSES = sorted(FAMILIES)  # class names are the sorted sub-folder names


def test_export_gives_the_pixels_of_its_run(tiny_run: Path, loaded, tmp_path: Path,
                                            assert_shared_mode) -> None:
    out = export_dit(tiny_run, tmp_path / "export")
    assert is_export(out) and sorted(p.name for p in out.iterdir()) == ["config.json",
                                                                         "model.safetensors"]
    assert_shared_mode(*out.iterdir())
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 2 and meta["class_names"] == CLASSES and meta["base_tokens"] == 64
    assert len(meta["vae_fingerprint"]) == 64 and meta["model_config"]["hidden_size"] == 64
    assert meta["resolution"] == 32  # the run's data.resolution
    model, vae, info = load_generator(out)
    assert info.source == out and info.vae_fingerprint == meta["vae_fingerprint"]
    assert info.resolution == 32
    args = dict(num_samples=2, cond=torch.tensor([1, 2]), steps=3, seed=11, base_tokens=64)
    assert torch.equal(generate(model, vae, 32, 32, **args),
                       generate(loaded[0], loaded[1], 32, 32, **args))
    with pytest.raises(ExportError, match="not --step 1"):
        load_generator(out, step=1)


def test_export_replaces_only_an_earlier_export(tiny_run: Path, tmp_path: Path) -> None:
    out = export_dit(tiny_run, tmp_path / "export")
    (out / "extra.txt").write_text("left by an earlier export")
    assert export_dit(tiny_run / "checkpoints" / "step_0000001", out) == out  # replaced
    assert json.loads((out / "config.json").read_text())["step"] == 1
    assert not (out / "extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_dit(tiny_run, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_export_refuses_to_replace_an_export_of_another_run(tiny_run: Path,
                                                            tmp_path: Path) -> None:
    out = export_dit(tiny_run, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    meta["source"] = str(tmp_path / "other_run" / "checkpoints" / "step_0000009")
    (out / "config.json").write_text(json.dumps(meta))  # as if exported from another run
    with pytest.raises(ExportError, match="holds an export of .*other_run.*refusing"):
        export_dit(tiny_run, out)
    assert json.loads((out / "config.json").read_text()) == meta


def test_export_weights_that_do_not_fit_name_missing_and_unexpected_keys(
        tiny_run: Path, tmp_path: Path) -> None:
    out = export_dit(tiny_run, tmp_path / "export")
    weights = load_file(out / "model.safetensors")
    dropped = sorted(weights)[0]
    weights["extra.weight"] = weights.pop(dropped)
    save_file(weights, out / "model.safetensors")
    with pytest.raises(ExportError, match=rf"1 missing \(e.g. \['{re.escape(dropped)}'\]\); "
                                          r"1 unexpected \(e.g. \['extra.weight'\]\)"):
        load_generator(out)


def test_export_of_a_checkpoint_with_older_key_names_writes_todays(tiny_run: Path,
                                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ema_file = run / "checkpoints" / "step_0000002" / "ema.safetensors"
    today = load_file(ema_file)
    # before `MLP` existed, a block's MLP layers were an nn.Sequential's 0 and 2
    save_file({k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v
               for k, v in today.items()}, ema_file)
    assert any(".mlp.0." in k for k in load_file(ema_file))
    exported = load_file(export_dit(run, tmp_path / "export") / "model.safetensors")
    assert exported.keys() == today.keys()
    assert all(torch.equal(exported[k], today[k]) for k in today)


def _other_vae(folder: Path, latent_channels: int = 4) -> Path:
    """A tiny VAE that is not the one `tiny_run` was trained with."""
    torch.manual_seed(1)
    return save_vae(AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                            latent_channels=latent_channels, sample_size=32)),
                    folder)


def test_export_refuses_a_mismatched_vae(tiny_run: Path, tmp_path: Path) -> None:
    out = export_dit(tiny_run, tmp_path / "export")
    with pytest.raises(ExportError, match="not the VAE"):
        load_generator(out, vae=_other_vae(tmp_path / "other_vae"))
    wide = _other_vae(tmp_path / "wide_vae", latent_channels=8)
    with pytest.raises(ExportError, match="8 latent channels"):
        load_generator(tiny_run, vae=wide)
    with pytest.raises(FileNotFoundError) as missing:
        load_generator(tiny_run, vae=tmp_path / "nope")
    assert str(missing.value) == f"{tmp_path / 'nope'}: VAE not found (given by --vae)"


def test_export_refuses_a_vae_changed_since_training(tiny_run: Path, tmp_path: Path) -> None:
    # Training checkpoints record their VAE's fingerprint: sampling from them with another VAE,
    # or exporting once the VAE at the recorded path has been replaced, is refused.
    other = _other_vae(tmp_path / "other_vae")
    with pytest.raises(ExportError, match="not the VAE"):
        load_generator(tiny_run, vae=other)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for state_file in run.glob("checkpoints/*/state.json"):
        state = json.loads(state_file.read_text())
        state["vae"] = str(other)  # as if the VAE at the recorded path had been replaced
        state_file.write_text(json.dumps(state))
    with pytest.raises(ExportError, match="changed since training"):
        export_dit(run, tmp_path / "export")
    with pytest.raises(ExportError, match="not the VAE .* given by --vae: an export would pair"):
        export_dit(tiny_run, tmp_path / "export", vae=other)
    assert not (tmp_path / "export").exists()


def test_export_names_the_kept_vae_when_a_vae_export_replaced_it(tiny_run: Path,
                                                                  tmp_path: Path) -> None:
    # A VAE run resumed after a DiT was trained on its export replaces the export and keeps the
    # earlier one beside it (models.vae.save_vae): the DiT's errors name that folder.
    run, vae = tmp_path / "run", tmp_path / "vae"
    shutil.copytree(tiny_run, run)
    recorded = json.loads((run / "checkpoints" / "step_0000002" / "state.json").read_text())
    shutil.copytree(recorded["vae"], vae)
    for state_file in run.glob("checkpoints/*/state.json"):
        state = json.loads(state_file.read_text())
        state["vae"] = str(vae)  # trained on tmp_path/vae
        state_file.write_text(json.dumps(state))
    torch.manual_seed(1)
    save_vae(AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                     latent_channels=4, sample_size=32)), vae, overwrite=True)
    kept = kept_vae_folder(vae, recorded["vae_fingerprint"])
    assert kept.is_dir()
    with pytest.raises(ExportError, match=rf"kept in {re.escape(str(kept))}\); pass --vae"):
        load_generator(run)
    _, autoencoder, info = load_generator(run, vae=kept)
    assert info.vae == kept and vae_fingerprint(autoencoder) == recorded["vae_fingerprint"]
    with pytest.raises(ExportError, match=rf"kept in {re.escape(str(kept))}\); it changed"):
        export_dit(run, tmp_path / "export")
    export_dit(run, tmp_path / "export", vae=kept)  # train.py --export RUN --vae KEPT
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["vae"] == str(kept) and meta["vae_fingerprint"] == recorded["vae_fingerprint"]
    _, autoencoder, _ = load_generator(tmp_path / "export")
    assert vae_fingerprint(autoencoder) == recorded["vae_fingerprint"]


def test_export_name_is_the_run_or_the_set_aside_branch_of_the_run() -> None:
    # a branch moved aside by resuming an older checkpoint keeps its run's name in its export's
    assert export_name(Path("runs/dit/checkpoints/step_0000400")) == "dit"
    branch = Path("runs/dit/set_aside/20261130-071200_after_step_0000200/checkpoints/step_0000400")
    assert export_name(branch) == "dit-20261130-071200_after_step_0000200"
