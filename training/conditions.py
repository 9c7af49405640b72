"""What a DiT run is conditioned on: class labels, captions, or nothing.

`run_condition` turns the data plan into the run's condition (`models/conditioning.py`): the
kind the model embeds, the fields its `DiTConfig` needs, and how a batch of samples gets its
condition. Captions are drawn per sample from the image's captions by the sample's augment
seed, so a resumed or torchrun run draws the same ones. With a frozen text encoder
(`text.encoder` a folder) every caption the run will use, the empty one included, is encoded
once into the text-embedding cache (`training/text_cache.py`, keyed by caption, encoder
fingerprint and `text.max_length`) before training, by the main process while the others wait,
and the encoder is freed: a step reads cached embeddings only. Caption dropout replaces a
sample's caption by the empty one at training time, so changing `text.dropout` needs no
re-encoding. The built-in encoder (`models/conditioning.ByteTextEncoder`) is part of the
model and reads bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.conditioning import ClassCondition, TextCondition, byte_condition
from training.config import Config, default_cache_dir, portable_path, resolve_path
from training.distributed import DistInfo, barrier
from training.plan import DataPlan


@dataclass
class RunCondition:
    """The condition of a run. `train(rows, seeds)` is the condition of the training records
    `rows` (with their augment seeds, which pick one caption each); `evaluate(rows)` that of
    the validation records `rows`; both None for an unconditional run. `state` goes into
    checkpoints and exports."""

    condition: ClassCondition | TextCondition
    model_fields: dict[str, Any]  # DiTConfig fields: num_classes, or the text fields
    dropout: float  # share of samples trained with the null condition
    train: Callable[[Sequence[int], Sequence[int]], Any] | None
    evaluate: Callable[[Sequence[int]], Any] | None
    preview: Callable[[int], Any] | None  # n -> the condition of n preview samples
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        """Whether samples carry a condition (classes or captions)."""
        return self.train is not None


def caption_seed(augment_seed: int) -> int:
    """The seed that picks a sample's caption, from its augment seed (which also decides its
    flip, so it is mixed first rather than used as it is)."""
    return int(np.random.default_rng([augment_seed, 1]).integers(2**31))


def run_condition(cfg: Config, plan: DataPlan, info: DistInfo) -> RunCondition:
    """The run's condition from its config and data plan (`data.captions`, else the plan's
    classes, else none)."""
    if cfg.data.captions:
        return _text_condition(cfg, plan, info)
    names = plan.class_names
    condition = ClassCondition(len(names), names)
    if not names:
        return RunCondition(condition, {"num_classes": 0}, 0.0, None, None, None)
    return RunCondition(
        condition, {"num_classes": len(names)}, cfg.dit.label_dropout,
        lambda rows, seeds: condition.batch(plan.records.label[np.asarray(rows)]),
        lambda rows: condition.batch(plan.eval_records.label[np.asarray(rows)]),
        lambda n: condition.batch([i % len(names) for i in range(n)]))


def preview_prompts(cfg: Config, plan: DataPlan) -> list[str]:
    """The prompts of the preview grids: `text.sample_prompts`, else the first distinct
    captions of the validation images, then of the training images."""
    if cfg.text.sample_prompts:
        return list(cfg.text.sample_prompts)
    prompts: dict[str, None] = {}
    for captions in (plan.eval_captions, plan.captions):
        for options in captions.options:
            if options and len(prompts) < cfg.dit.num_samples:
                prompts[options[0]] = None
    return list(prompts) or [""]


def _text_condition(cfg: Config, plan: DataPlan, info: DistInfo) -> RunCondition:
    t = cfg.text
    prompts = preview_prompts(cfg, plan)
    if t.encoder == "builtin":
        fields = {"text": "builtin", "text_max_length": t.max_length, "text_depth": t.depth}
        condition = byte_condition(t.max_length)
        state = dict(condition.info)  # {"kind": "builtin", "max_length"}
    else:
        condition, fields, state = _frozen_condition(cfg, plan, info, prompts)

    def train(rows: Sequence[int], seeds: Sequence[int]) -> Any:
        return condition.batch(plan.captions.pick(rows, [caption_seed(s) for s in seeds]))

    def evaluate(rows: Sequence[int]) -> Any:  # the first caption of each: a fixed target
        return condition.batch(plan.eval_captions.pick(rows, [0] * len(rows)))

    def preview(n: int) -> Any:
        return condition.batch([prompts[i % len(prompts)] for i in range(n)])

    return RunCondition(condition, fields, t.dropout, train, evaluate, preview, state)


def text_cache_root(cfg: Config) -> Path:
    """Where frozen encoders' caption embeddings are cached: `text/` beside the latents."""
    latents = resolve_path(cfg.dit.cache_dir) if cfg.dit.cache_dir else None
    return (latents.parent if latents else default_cache_dir()) / "text"


def _frozen_condition(cfg: Config, plan: DataPlan, info: DistInfo, prompts: list[str]
                      ) -> tuple[TextCondition, dict[str, Any], dict[str, Any]]:
    """A frozen encoder's condition: encode what is not cached yet (main process), then read
    every caption's embedding from the cache."""
    from training.text_cache import TextEmbeddingCache
    from training.text_encoders import encoder_fingerprint, load_text_encoder, position_limit

    t = cfg.text
    path = resolve_path(t.encoder)
    fingerprint = encoder_fingerprint(path)  # a missing or bad folder is refused here
    limit = position_limit(path)
    max_length = min(t.max_length, limit or t.max_length)
    if max_length < t.max_length and info.is_main:
        print(f"text encoder {path}: takes at most {limit} tokens; captions are cut there "
              f"(text.max_length {t.max_length})", flush=True)
    root = text_cache_root(cfg) / t.dtype  # embeddings computed in bf16 and fp32 differ
    cache = TextEmbeddingCache(root, fingerprint, max_length)
    if info.is_main:
        wanted = [*plan.captions.distinct(), *plan.eval_captions.distinct(), *prompts, ""]
        missing = cache.missing(wanted)
        if missing:
            print(f"text encoder {path}: encoding {len(missing)} caption(s) not cached yet",
                  flush=True)
            encoder = load_text_encoder(path, max_length, t.dtype, info.device)
            summary = cache.ensure(missing, encoder, progress=True)
            print(f"text cache: {summary['encoded']} encoded "
                  f"({summary['captions_per_s']:.0f} captions/s), {summary['reused']} reused",
                  flush=True)
            del encoder
        else:
            print(f"text cache: all {len(set(wanted))} caption(s) cached", flush=True)
    barrier()
    if not info.is_main:
        cache = TextEmbeddingCache(root, fingerprint, max_length)
    (empty,) = cache.get([""])
    info_json = {"kind": "frozen", "path": portable_path(path), "fingerprint": fingerprint,
                 "max_length": max_length, "dtype": t.dtype,
                 "dim": int(empty.tokens.shape[-1]),
                 "pooled_dim": 0 if empty.pooled is None else int(empty.pooled.shape[-1])}
    condition = TextCondition(
        lambda caps: [(e.tokens, e.pooled) for e in cache.get(caps)], info_json)
    fields = {"text": "frozen", "text_dim": info_json["dim"],
              "text_pooled_dim": info_json["pooled_dim"]}
    return condition, fields, info_json


def check_text_resume(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a checkpoint's text state (`RunCondition.state`) does not fit this run's, or None."""
    if not saved and not current:
        return None
    if bool(saved) != bool(current):
        return "captions in one of the two runs only"
    for key in ("kind", "fingerprint", "max_length"):
        if saved.get(key) != current.get(key):
            return (f"text encoder {key} {str(saved.get(key))[:16]!r} vs "
                    f"{str(current.get(key))[:16]!r}")
    return None



def frozen_text_condition(text: dict[str, Any], override: str | os.PathLike | None,
                          device: Any, source: Path) -> TextCondition:
    """The condition of a model trained on a frozen encoder's features (`text`, its recorded
    `RunCondition.state`), encoding prompts with that encoder: the recorded folder or
    `override`, refused unless its fingerprint is the recorded one. The encoder is loaded at
    the first prompt (importing transformers takes seconds)."""
    from training.text_encoders import encoder_fingerprint, load_text_encoder

    path = Path(override) if override is not None else resolve_path(text["path"])
    if not path.exists():
        where = "given by --text-encoder" if override is not None else f"recorded in {source}"
        raise FileNotFoundError(f"{path}: text encoder not found ({where}); pass "
                                "--text-encoder FOLDER")
    found = encoder_fingerprint(path)
    if found != text["fingerprint"]:
        raise ValueError(f"{path}: not the text encoder {source} was trained with (fingerprint "
                         f"{found[:12]}, expected {text['fingerprint'][:12]}); pass "
                         "--text-encoder with that folder")
    loaded: list = []

    def encode(captions: list[str]) -> list:
        if not loaded:
            loaded.append(load_text_encoder(path, text["max_length"], text.get("dtype", "fp32"),
                                            device))
        return [(e.tokens, e.pooled) for e in loaded[0].encode(captions)]

    return TextCondition(encode, {**text, "path": portable_path(path)})
