"""Frozen Hugging Face text encoders for text-to-image conditioning (issue 20).

`load_text_encoder(folder)` loads a text encoder from a local folder only (never the hub) and
returns a `FrozenTextEncoder` whose `encode` turns captions into `TextEmbedding`s: the valid
tokens of the last hidden state, plus a pooled vector for CLIP, as float16 CPU tensors ready to
be cached (`training/text_cache.py`). Three kinds are recognised from `config.json`:

- "clip": a CLIP text model (`clip_text_model`, or the text half of a full `clip` folder). With a
  `text_projection` in the weights, pooled is the projected text embedding; else pooler_output.
- "t5": the encoder of a T5, mT5 or UMT5; no pooled output.
- "decoder": any decoder language model AutoModel loads (GPT-2, Llama, Gemma, Qwen2, ...), used
  through its last hidden state as Sana and Lumina use Gemma; no pooled output.

`encoder_fingerprint(folder)` hashes config.json, the tokenizer files and the weight files
(names and bytes) without loading anything, so that exports and caches can check that they were
made with the same encoder. Importing this module does not import transformers (slow); the
functions that need it import it themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLIP_TYPES = frozenset({"clip_text_model", "clip"})
T5_TYPES = frozenset({"t5", "mt5", "umt5"})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_NAMES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
EXPECTED = "expected a Hugging Face text encoder folder (config.json, tokenizer files, weights)"
FP16_MAX = 65504.0  # largest finite float16; wider activations are clamped, never inf


@dataclass
class TextEmbedding:
    """One caption's embedding, as stored in the text cache.

    tokens: (L, D) float16 on CPU, the valid tokens only (no padding); L may be 0.
    pooled: (P,) float16 on CPU, or None when the encoder has no pooled output.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None


class TextEncoderError(ValueError):
    """A text encoder folder that cannot be used; the message is one line naming the folder."""


def _reason(exc: Exception) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_NAMES or name.startswith("tokenizer") or name.endswith(".tiktoken")


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _read_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The folder and its parsed config.json; TextEncoderError when either is missing or bad."""
    folder = Path(path)
    if not folder.is_dir():
        raise TextEncoderError(f"{folder}: no such folder; {EXPECTED}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TextEncoderError(f"{folder}: no config.json; {EXPECTED}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TextEncoderError(f"{config_path}: not readable JSON ({exc}); {EXPECTED}") from None
    if not isinstance(config, dict):
        raise TextEncoderError(f"{config_path}: not a JSON object; {EXPECTED}")
    return folder, config


def _fingerprint_files(folder: Path) -> list[Path]:
    """config.json, the tokenizer files and the weight files of the folder, sorted by name."""
    files = [p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or _is_tokenizer_file(p.name) or _is_weight_file(p.name))]
    return sorted(files, key=lambda p: p.name)


def encoder_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex over the names and bytes of config.json, the tokenizer and the weight files.

    Nothing is loaded, so this is cheap enough to check an export or a cache against a folder
    (it still reads every weight byte). File times and the folder's own path do not count: a
    copy of the folder has the same fingerprint.
    """
    folder, _ = _read_config(path)
    digest = hashlib.sha256()
    for file in _fingerprint_files(folder):
        digest.update(file.name.encode("utf-8") + b"\0")
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def position_limit(path: str | os.PathLike) -> int | None:
    """The most tokens the folder's encoder takes, from its config.json alone (a CLIP's 77, a
    decoder's max_position_embeddings or n_positions); None when it has no fixed limit (T5's
    relative positions) or the config names none."""
    _, config = _read_config(path)
    if config.get("model_type") in T5_TYPES:
        return None
    if config.get("model_type") == "clip":
        config = config.get("text_config") or {}
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _kind(folder: Path, config: dict[str, Any]) -> str:
    """"clip", "t5" or "decoder" from the config's model_type; TextEncoderError otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CLIP_TYPES:
        if model_type == "clip" and not isinstance(config.get("text_config"), dict):
            raise TextEncoderError(f"{folder}: clip config.json has no text_config; {EXPECTED}")
        return "clip"
    if model_type in T5_TYPES:
        return "t5"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise TextEncoderError(
        f"{folder}: model_type {model_type!r} is not a text encoder; expected a CLIP text model, "
        "a T5 encoder or a decoder language model")


def _weight_names(folder: Path) -> Iterator[str]:
    """Tensor names in the folder's weight files, read from headers (safetensors) or mmap."""
    from safetensors import safe_open

    for file in _fingerprint_files(folder):
        if file.name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                yield from handle.keys()
        elif file.name.endswith((".bin", ".pt", ".pth")):
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the block."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, padding on the right with a pad token (eos when none is set)."""
    from transformers import AutoTokenizer

    if not any(_is_tokenizer_file(p.name) for p in folder.iterdir()):
        raise TextEncoderError(f"{folder}: no tokenizer files (tokenizer.json, vocab.json, "
                               f"spiece.model, ...); {EXPECTED}")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types; report them as one line
        raise TextEncoderError(
            f"{folder}: tokenizer does not load ({_reason(exc)}); {EXPECTED}") from None
    tokenizer.padding_side = "right"  # valid tokens keep positions 0..L-1 in every batch
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TextEncoderError(f"{folder}: tokenizer has neither a pad nor an eos token; "
                                   "expected one of them for padding")
        tokenizer.pad_token = tokenizer.eos_token  # on the loaded object only, files untouched
    return tokenizer


def _load_model(folder: Path, kind: str,
                config: dict[str, Any]) -> tuple[torch.nn.Module, bool]:
    """The encoder module for `kind` and whether it projects CLIP's pooled output."""
    import transformers

    projection = kind == "clip" and any(
        name.endswith("text_projection.weight") for name in _weight_names(folder))
    overrides = {}
    if projection and config.get("model_type") == "clip" and "projection_dim" in config:
        # a full CLIP keeps the projection width at the top level; its text_config may not
        overrides["projection_dim"] = config["projection_dim"]
    if kind == "clip":
        name = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    else:
        name = "T5EncoderModel" if kind == "t5" else "AutoModel"
    try:
        with _quiet_transformers():
            model = getattr(transformers, name).from_pretrained(
                folder, local_files_only=True, **overrides)
    except Exception as exc:  # transformers raises many types; report them as one line
        raise TextEncoderError(
            f"{folder}: {name} does not load ({_reason(exc)}); {EXPECTED}") from None
    return model, projection


class FrozenTextEncoder:
    """A loaded, frozen text encoder: captions in, float16 CPU `TextEmbedding`s out.

    Attributes: path (the folder), kind ("clip", "t5" or "decoder"), fingerprint (see
    `encoder_fingerprint`), max_length (tokens kept per caption, specials included), dim (width D
    of the tokens) and pooled_dim (width P of pooled, 0 when there is none). Build it with
    `load_text_encoder`.
    """

    def __init__(self, path: Path, kind: str, fingerprint: str, max_length: int,
                 model: torch.nn.Module, tokenizer: Any, projection: bool) -> None:
        self.path = path
        self.kind = kind
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.model = model
        self.tokenizer = tokenizer
        self.projection = projection
        config = model.config
        self.dim = int(config.hidden_size)
        if kind != "clip":
            self.pooled_dim = 0
        else:
            self.pooled_dim = int(config.projection_dim if projection else config.hidden_size)

    @property
    def device(self) -> torch.device:
        """The device the encoder computes on."""
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """The encoder's identity for exports and cache checks (JSON-ready)."""
        return {"path": str(self.path), "kind": self.kind, "fingerprint": self.fingerprint,
                "max_length": self.max_length, "dim": self.dim, "pooled_dim": self.pooled_dim}

    def encode(self, captions: list[str], batch_size: int = 64) -> list[TextEmbedding]:
        """Embed captions in batches, in input order; padding never changes a caption's result.

        Captions are batched longest first (less padding) and truncated at max_length tokens.
        """
        if batch_size < 1:
            raise ValueError(f"{self.path}: batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]), reverse=True)
        out: list[TextEmbedding | None] = [None] * len(captions)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                for row, embedding in zip(rows, self._encode_batch([captions[i] for i in rows])):
                    out[row] = embedding
        return out  # type: ignore[return-value]  # every slot was filled

    def _encode_batch(self, texts: list[str]) -> list[TextEmbedding]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, T)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, T)
        if ids.shape[1] == 0:  # every caption tokenized to nothing (a GPT-2 style "")
            empty = torch.zeros(0, self.dim, dtype=torch.float16)
            return [TextEmbedding(empty.clone(), None) for _ in texts]
        outputs = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = _to_fp16(outputs.last_hidden_state)  # (B, T, D)
        pooled = None
        if self.kind == "clip":
            pooled = _to_fp16(outputs.text_embeds if self.projection
                              else outputs.pooler_output)  # (B, P)
        mask = mask.cpu()
        return [TextEmbedding(hidden[i][mask[i]].contiguous(),  # (L_i, D)
                              None if pooled is None else pooled[i].clone())  # (P,)
                for i in range(len(texts))]


def _to_fp16(x: torch.Tensor) -> torch.Tensor:
    """float16 CPU copy, clamped to float16's finite range."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).cpu()


def load_text_encoder(path: str | os.PathLike, max_length: int = 77, dtype: str = "fp32",
                      device: str | torch.device = "cpu") -> FrozenTextEncoder:
    """Load the text encoder in a local folder (never the hub), frozen and in eval mode.

    dtype is the compute precision, "fp32" or "bf16"; outputs are float16 either way. A folder
    that is missing, has no config.json or tokenizer, or holds something other than a CLIP text
    model, a T5 encoder or a decoder LM raises TextEncoderError with a one-line message.
    """
    folder, config = _read_config(path)
    if dtype not in DTYPES:
        raise TextEncoderError(f"{folder}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if max_length < 1:
        raise TextEncoderError(f"{folder}: max_length must be at least 1, got {max_length}")
    kind = _kind(folder, config)
    tokenizer = _load_tokenizer(folder)
    model, projection = _load_model(folder, kind, config)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    positions = getattr(model.config, "max_position_embeddings", None)
    if kind != "t5" and isinstance(positions, int) and max_length > positions:
        raise TextEncoderError(f"{folder}: max_length {max_length} exceeds the model's "
                               f"{positions} positions; expected at most {positions}")
    return FrozenTextEncoder(folder, kind, encoder_fingerprint(folder), max_length, model,
                             tokenizer, projection)
