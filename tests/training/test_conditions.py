"""Text-to-image runs end to end (`training/conditions.py`): captions from sidecars and
metadata.jsonl, the built-in encoder, frozen encoders' cached embeddings, exact resume,
torchrun, inference with prompts, and the one-line errors. Tiny models, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import Config, from_dict
from training.dit_stage import train_dit
from tests.training.test_dit_stage import _config, _scalars, _train
from tests.training.text_encoder_files import make_clip_text, make_t5_encoder, make_vision_model

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _text_config(tmp_path: Path, vae: Path, name: str = "run", dataset: str = "synthetic:24",
                 text: dict | None = None, **train) -> Path:
    path = _config(tmp_path / f"{name}.json", tmp_path / name, vae, **train)
    data = json.loads(path.read_text())
    data["data"].update(use_classes=False, captions=True, dataset=dataset)
    data["dit"]["cache_dir"] = str(tmp_path / "cache" / "latents")
    data["text"] = {"max_length": 48, "depth": 1, **(text or {})}
    path.write_text(json.dumps(data))
    return path


def _weights(run: Path, step: int, group: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{group}.safetensors")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen CLIP text encoder with a text projection (pooled output)."""
    return make_clip_text(tmp_path_factory.mktemp("clip") / "clip", projection=True)


def _captioned_folder(root: Path, count: int = 8) -> Path:
    """`count` random 32x32 PNGs with sidecar captions (image 0 has two lines, the last
    none)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        if i < count - 1:
            (root / f"{i}.txt").write_text(f"picture number {i}\n"
                                           + ("another caption of it\n" if i == 0 else ""))
    return root


def _frozen_cfg(tmp_path: Path, vae: Path, encoder: Path, name: str = "run",
                **text) -> Config:
    path = _text_config(tmp_path, vae, name, dataset=str(tmp_path / "data"),
                        text={"encoder": str(encoder), "dtype": "fp32", **text}, max_steps=1)
    cfg = from_dict(Config, json.loads(path.read_text()))
    cfg.data.holdout = 2
    return cfg


def test_conditions_frozen_encoder_encodes_each_caption_once(tmp_path: Path, tiny_vae: Path,
                                                             clip: Path, capsys) -> None:
    """Every caption is encoded once: a second run reuses the cache, an edited caption is the
    only one encoded again, and another dropout rate needs no encoding (the empty caption is
    cached too)."""
    _captioned_folder(tmp_path / "data")
    run = train_dit(_frozen_cfg(tmp_path, tiny_vae, clip, "a"))
    out = capsys.readouterr().out
    # 8 captions of 7 captioned images, the empty one; the preview prompts are among them
    assert "encoding 9 caption(s) not cached yet" in out, out
    assert "captions (" in out and "1 without" in out
    state = load_checkpoint(latest_checkpoint(run)).state["text"]
    assert state["kind"] == "frozen" and state["max_length"] == 48 and state["pooled_dim"] == 16
    train_dit(_frozen_cfg(tmp_path, tiny_vae, clip, "b"))
    assert "all 9 caption(s) cached" in capsys.readouterr().out
    (tmp_path / "data" / "3.txt").write_text("an edited caption\n")
    train_dit(_frozen_cfg(tmp_path, tiny_vae, clip, "c"))
    assert "encoding 1 caption(s) not cached yet" in capsys.readouterr().out
    train_dit(_frozen_cfg(tmp_path, tiny_vae, clip, "d", dropout=0.5))
    assert "all 9 caption(s) cached" in capsys.readouterr().out


def test_conditions_frozen_resume_refuses_another_encoder(tmp_path: Path, tiny_vae: Path,
                                                          clip: Path) -> None:
    from training.config import ConfigError

    _captioned_folder(tmp_path / "data")
    train_dit(_frozen_cfg(tmp_path, tiny_vae, clip))
    other = make_clip_text(tmp_path / "other", projection=True, seed=1)
    cfg = _frozen_cfg(tmp_path, tiny_vae, other)
    cfg.train.max_steps = 2
    with pytest.raises(ConfigError, match="another model.*text encoder fingerprint"):
        train_dit(cfg, resume="")


def test_conditions_cached_dropout_gives_the_empty_caption(tmp_path: Path) -> None:
    """Caption dropout on cached embeddings: a dropped sample gets the cached embedding of ""
    (padding masked), the others keep theirs."""
    from models.conditioning import TextCondition
    from tests.training.text_encoder_files import StandInEncoder
    from training.flow import RectifiedFlow
    from training.text_cache import TextEmbeddingCache

    encoder = StandInEncoder(dim=4)
    cache = TextEmbeddingCache(tmp_path, encoder.fingerprint, encoder.max_length)
    captions = ["a red disc", "two blue stripes here", "green", "x y"]
    cache.ensure(captions + [""], encoder)
    condition = TextCondition(lambda caps: [(e.tokens, e.pooled) for e in cache.get(caps)])
    flow = RectifiedFlow(condition, dropout=0.5)
    cond = condition.batch(captions)
    dropped = flow.drop_condition(cond, 4, torch.device("cpu"), torch.Generator().manual_seed(1))
    rows = [text == "" for text in dropped.texts]
    assert 0 < sum(rows) < 4
    (empty,) = cache.get([""])
    for i, gone in enumerate(rows):
        kept = condition.batch([""] if gone else [captions[i]])
        n = int(kept.mask.sum())
        assert int(dropped.mask[i].sum()) == n
        torch.testing.assert_close(dropped.tokens[i, :n], kept.tokens[0, :n])
        torch.testing.assert_close(dropped.pooled[i], kept.pooled[0])
    assert torch.equal(condition.batch([""]).pooled[0], empty.pooled.float())


def test_conditions_frozen_caption_gives_the_same_output_at_two_max_lengths(
        tmp_path: Path) -> None:
    """A caption encoded by a frozen T5 at max_length 16 and 64 (padded differently in its
    batch) gives the same DiT output."""
    from models.conditioning import TextCondition
    from models.dit import DiT, DiTConfig
    from training.text_encoders import load_text_encoder

    folder = make_t5_encoder(tmp_path / "t5")
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, text="frozen", text_dim=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(1, 4, 4, 4), torch.rand(1)
    outputs = []
    for length, company in ((16, "a"), (64, "a much longer caption to pad the batch with")):
        encoder = load_text_encoder(folder, max_length=length)
        condition = TextCondition(lambda caps: [(e.tokens, e.pooled)
                                                for e in encoder.encode(caps)])
        cond = condition.batch(["two red discs", company])
        outputs.append(model(x, t, cond[0:1].padded(cond.tokens.shape[1])))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["caption_file", "encoder_missing", "not_text", "prompt"])
def test_conditions_bad_text_input_is_one_line_error(tmp_path: Path, tiny_vae: Path,
                                                     case: str, capsys) -> None:
    import train

    _captioned_folder(tmp_path / "data")
    cfg = _text_config(tmp_path, tiny_vae, dataset=str(tmp_path / "data"), max_steps=1)
    args = ["--config", str(cfg), "--holdout", "2"]
    if case == "caption_file":
        (tmp_path / "data" / "2.txt").write_bytes(b"caf\xe9 latin-1\n")
        expected = "2.txt"
    elif case == "encoder_missing":
        args += ["--text-encoder", str(tmp_path / "nowhere")]
        expected = "nowhere"
    elif case == "not_text":
        args += ["--text-encoder", str(make_vision_model(tmp_path / "vit"))]
        expected = "not a text encoder"
    else:  # --prompt for a class-conditional model
        inference = _inference_cli()
        assert train.main(["--config", str(cfg), "--no-captions", "--classes",
                           "--dataset", "synthetic:24"]) == 0
        capsys.readouterr()
        code = inference.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "a cat",
                               "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "class-conditional" in err[0], err
        return
    capsys.readouterr()  # what building the files printed
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))


def _inference_cli():
    """inference.py as a module (the name `inference` is the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_cli", REPO_ROOT / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conditions_text_quickstart_end_to_end(tmp_path: Path, tiny_vae: Path,
                                               capsys) -> None:
    """The README's text quickstart in small: synthetic captions, the built-in encoder, prompt
    grids, then sampling from a prompt (PNG metadata) and from the export."""
    cfg = _text_config(tmp_path, tiny_vae, max_steps=2, eval_every=2, sample_every=2)
    out = _train("--config", str(cfg))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "captions: 20 images, 20 captioned" in out.stdout
    assert "captions (builtin text encoder)" in out.stdout
    run = tmp_path / "run"
    prompts = (run / "samples" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 2 and all(" " in p for p in prompts)  # validation captions
    assert _scalars(run, "loss/val") and _scalars(run, "loss/train")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    (logged,) = events.Tensors("samples/prompts/text_summary")  # TensorBoard's Text tab
    assert prompts[0] in logged.tensor_proto.string_val[0].decode()
    state = load_checkpoint(latest_checkpoint(run)).state
    assert state["text"] == {"kind": "builtin", "max_length": 48}
    assert any(k.startswith("text.") for k in _weights(run, 2, "ema"))  # the encoder is EMA'd

    sample = subprocess.run(
        [sys.executable, "inference.py", "--checkpoint", str(run), "--prompt",
         "two red discs on a white background", "--negative-prompt", "stripes",
         "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "out"), "--json",
         "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]
    summary = json.loads(sample.stdout)
    assert summary["prompts"] == ["two red discs on a white background"] * 2
    chunks = Image.open(summary["files"][0]).text
    assert chunks["prompt"] == "two red discs on a white background"
    assert chunks["negative_prompt"] == "stripes"
    cli = _inference_cli()
    for flags, words in ((["--class-label", "1"], "give --prompt, not --class-label"),
                         ([], "give --prompt or --prompts-file")):
        capsys.readouterr()
        code = cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "bad"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "bad").exists()


def test_conditions_text_resume_is_exact(tmp_path: Path, tiny_vae: Path) -> None:
    """Two steps, then a resume to four, train as four straight: the built-in encoder, its
    EMA, the optimizer and each sample's caption pick are restored."""
    def cfg(name: str, steps: int) -> Config:
        path = _text_config(tmp_path, tiny_vae, name, max_steps=steps, ckpt_every=2)
        return from_dict(Config, json.loads(path.read_text()))

    train_dit(cfg("a", 4))
    train_dit(cfg("b", 2))
    train_dit(cfg("b", 4), resume="")
    assert _scalars(tmp_path / "a", "loss/train") == _scalars(tmp_path / "b", "loss/train")
    for group in ("model", "ema"):
        a, b = _weights(tmp_path / "a", 4, group), _weights(tmp_path / "b", 4, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group


def test_conditions_frozen_torchrun_two_ranks_train_as_one_rank(tmp_path: Path, tiny_vae: Path,
                                                               clip: Path) -> None:
    """2 ranks × batch 2 train a frozen-encoder text run as 1 rank × batch 4 does (each rank
    reads the caption embeddings the first run cached; captions are picked by sample)."""
    import os

    _captioned_folder(tmp_path / "data", count=12)
    one = _frozen_cfg(tmp_path, tiny_vae, clip, "one")
    one.batch_size, one.train.max_steps = 4, 3
    train_dit(one)  # in this process: it encodes the captions into the cache
    two = _text_config(tmp_path, tiny_vae, "two", dataset=str(tmp_path / "data"),
                       text={"encoder": str(clip), "dtype": "fp32"}, max_steps=3)
    data = json.loads(two.read_text())
    data["data"]["holdout"] = 2
    two.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29521", "train.py", "--config", str(two)],
                         cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "text cache: all 13 caption(s) cached" in out.stdout, out.stdout[-3000:]
    a, b = _scalars(tmp_path / "one", "loss/train"), _scalars(tmp_path / "two", "loss/train")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # only the order of float sums (DDP's all-reduce) differs
        assert abs(a[step] - b[step]) <= 1e-5 * a[step], (step, a[step], b[step])
    x, y = _weights(tmp_path / "one", 3), _weights(tmp_path / "two", 3)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-5, msg=k)
