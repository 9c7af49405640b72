"""Frozen text encoders on tiny random-weight CLIP, T5 and GPT-2 folders built in the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.training.text_encoder_files import (make_clip_full, make_clip_text, make_decoder_lm,
                                               make_t5_encoder, make_vision_model)
from training.text_encoders import (FrozenTextEncoder, TextEncoderError, encoder_fingerprint,
                                    load_text_encoder)

LONG = "a watercolor sketch of a sailing ship on a calm blue sea with birds and a lighthouse"
CAPTIONS = ["a cat", "", LONG, "A Cat", "3 apples, 2 pears! (digital art)", "héllo wörld ☃"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-encoders")
    return {"clip": make_clip_text(root / "clip"),
            "clip-projection": make_clip_text(root / "clip-projection", projection=True),
            "t5": make_t5_encoder(root / "t5"),
            "decoder": make_decoder_lm(root / "decoder")}


@pytest.fixture(scope="module")
def encoders(folders: dict[str, Path]) -> dict[str, FrozenTextEncoder]:
    return {name: load_text_encoder(path, max_length=16) for name, path in folders.items()}


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3)  # fp16 rounding


@pytest.mark.parametrize("name,kind,pooled_dim", [("clip", "clip", 32),
                                                  ("clip-projection", "clip", 16),
                                                  ("t5", "t5", 0), ("decoder", "decoder", 0)])
def test_text_encoders_each_kind_encodes_fp16_valid_tokens(
        encoders: dict[str, FrozenTextEncoder], folders: dict[str, Path], name: str, kind: str,
        pooled_dim: int) -> None:
    encoder = encoders[name]
    assert (encoder.kind, encoder.dim, encoder.pooled_dim) == (kind, 32, pooled_dim)
    assert encoder.describe() == {"path": str(folders[name]), "kind": kind,
                                  "fingerprint": encoder_fingerprint(folders[name]),
                                  "max_length": 16, "dim": 32, "pooled_dim": pooled_dim}
    out = encoder.encode(CAPTIONS, batch_size=4)
    assert len(out) == len(CAPTIONS)
    for caption, emb in zip(CAPTIONS, out):
        ids = encoder.tokenizer(caption, truncation=True, max_length=16)["input_ids"]
        assert emb.tokens.shape == (len(ids), 32)
        assert emb.tokens.dtype == torch.float16 and emb.tokens.device.type == "cpu"
        assert torch.isfinite(emb.tokens).all()
        if pooled_dim:
            assert emb.pooled.shape == (pooled_dim,) and emb.pooled.dtype == torch.float16
        else:
            assert emb.pooled is None
    assert not torch.equal(out[0].tokens, out[3].tokens) or kind == "clip"  # CLIP lowercases


@pytest.mark.parametrize("name", ["clip-projection", "t5", "decoder"])
def test_text_encoders_padding_does_not_change_a_caption(
        encoders: dict[str, FrozenTextEncoder], name: str) -> None:
    encoder = encoders[name]
    batched = encoder.encode(CAPTIONS, batch_size=len(CAPTIONS))
    for caption, emb in zip(CAPTIONS, batched):
        alone = encoder.encode([caption])[0]
        _assert_same(emb.tokens, alone.tokens)
        if alone.pooled is not None:
            _assert_same(emb.pooled, alone.pooled)


@pytest.mark.parametrize("name,empty_length", [("clip", 2), ("t5", 1), ("decoder", 0)])
def test_text_encoders_truncate_at_max_length_and_encode_empty_caption(
        folders: dict[str, Path], name: str, empty_length: int) -> None:
    encoder = load_text_encoder(folders[name], max_length=5, dtype="bf16")
    long, empty = encoder.encode([LONG, ""])
    assert long.tokens.shape == (5, 32)  # CLIP and T5 keep their closing token within the 5
    assert empty.tokens.shape == (empty_length, 32)
    full = load_text_encoder(folders[name], max_length=16).encode([LONG])[0]
    assert full.tokens.shape[0] > 5


def test_text_encoders_full_clip_folder_uses_its_projected_text_half(tmp_path: Path) -> None:
    encoder = load_text_encoder(make_clip_full(tmp_path / "clip"), max_length=16)
    assert (encoder.kind, encoder.dim, encoder.pooled_dim) == ("clip", 32, 16)
    assert type(encoder.model).__name__ == "CLIPTextModelWithProjection"
    cat, empty = encoder.encode(["a cat", ""])
    assert cat.tokens.shape == (5, 32) and empty.tokens.shape == (2, 32)
    assert cat.pooled.shape == (16,)


def test_text_encoders_fingerprint_follows_weights_and_tokenizer_not_location(
        folders: dict[str, Path], tmp_path: Path) -> None:
    original = encoder_fingerprint(folders["t5"])
    copy = Path(shutil.copytree(folders["t5"], tmp_path / "copy"))
    assert encoder_fingerprint(copy) == original
    (copy / "README.md").write_text("notes do not count")
    assert encoder_fingerprint(copy) == original
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"</s>"', '"</S>"'))
    edited_tokenizer = encoder_fingerprint(copy)
    assert edited_tokenizer != original
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert encoder_fingerprint(copy) not in (original, edited_tokenizer)


def test_text_encoders_refuse_bad_folders_with_one_line(folders: dict[str, Path],
                                                        tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    vision = make_vision_model(tmp_path / "vit")
    no_tokenizer = Path(shutil.copytree(folders["t5"], tmp_path / "no-tokenizer"))
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    cases = [(missing, "no such folder"), (no_config, "no config.json"),
             (vision, "'vit' is not a text encoder"), (no_tokenizer, "no tokenizer files")]
    for folder, problem in cases:
        with pytest.raises(TextEncoderError) as info:
            load_text_encoder(folder)
        message = str(info.value)
        assert "\n" not in message and str(folder) in message and problem in message
    with pytest.raises(TextEncoderError, match="no config.json"):
        encoder_fingerprint(no_config)
    with pytest.raises(TextEncoderError, match="exceeds the model's 77 positions"):
        load_text_encoder(folders["clip"], max_length=78)
