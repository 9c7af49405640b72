"""Tiny random-weight text encoder folders, built in the test (never downloaded).

Each builder writes a seeded model with `save_pretrained` (safetensors) and a tokenizer made here
into a folder that `training.text_encoders.load_text_encoder` (and transformers' Auto classes)
load from disk:

- `make_clip_text`: a CLIP text model (optionally with a text projection) and a CLIP tokenizer
  from a hand-written byte-level vocab.json + merges.txt (every byte, with and without the
  end-of-word mark, a few merges, then `<|startoftext|>` and `<|endoftext|>` last, as in CLIP).
- `make_clip_full`: a whole CLIP (`clip` config with text and vision towers) whose text half is
  the encoder.
- `make_t5_encoder`: a T5 encoder and a BPE tokenizer trained with `tokenizers` on a few dozen
  sentences, with `<pad>` = 0, `</s>` = 1 appended to every caption and `<unk>` = 2.
- `make_decoder_lm`: a GPT-2 language model and a trained byte-level BPE with no pad token.
- `make_vision_model`: a ViT, the "not a text encoder" case.

`StandInEncoder` is a deterministic stand-in with the `FrozenTextEncoder` attributes the text
cache uses; it lets subprocesses exercise the cache without importing transformers (~10 s).
transformers is imported inside the builders only.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from training.text_encoders import TextEmbedding

SENTENCES = [
    "a photo of a cat sitting on a red chair",
    "a dog running on the beach at sunset",
    "an oil painting of a mountain lake in winter",
    "two people walking through a busy market",
    "a close-up of a yellow flower with water drops",
    "the city skyline at night, with bright lights",
    "a bowl of fruit on a wooden kitchen table",
    "a small boat on a calm blue sea",
    "a black and white portrait of an old man",
    "children playing football in a park",
    "a cup of coffee next to an open book",
    "a red car parked in front of a house",
    "snow falling on a quiet forest road",
    "a bird flying over green hills",
    "an astronaut riding a horse on the moon",
    "a watercolor sketch of a sailing ship",
    "a plate of pasta with tomato sauce",
    "a lighthouse on a rocky coast during a storm",
    "a cat and a dog sleeping together",
    "a street in the rain with umbrellas",
    "3 apples, 2 pears and 1 banana!",
    "a robot reading a newspaper (digital art)",
    "the quick brown fox jumps over the lazy dog",
    "a field of sunflowers under a clear sky",
    "a girl with a blue hat holding a balloon",
    "an empty room with a large window",
    "a train crossing a bridge over a river",
    "a snowy mountain village at dawn",
    "a teddy bear on a skateboard in times square",
    "a macro photo of a honeybee on lavender",
]
CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"),
               ("in", "g</w>"), ("o", "n</w>"), ("a", "t</w>"), ("e", "r</w>"), ("o", "f</w>")]


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _clip_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt of a byte-level BPE in CLIP's layout."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(pair) for pair in CLIP_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    merges = "\n".join(f"{a} {b}" for a, b in CLIP_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")


def make_clip_text(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                   projection: bool = False, seed: int = 0) -> Path:
    """A CLIP text model (with a `text_projection` when asked) and its tokenizer in `folder`."""
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    folder = Path(folder)
    raw = folder / "raw-tokenizer"
    raw.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer_files(raw)
    tokenizer = CLIPTokenizer.from_pretrained(raw, local_files_only=True)
    tokenizer.save_pretrained(folder)
    for file in raw.iterdir():
        file.unlink()
    raw.rmdir()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        projection_dim=hidden // 2 if projection else hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    _seeded(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_clip_full(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                   seed: int = 0) -> Path:
    """A full CLIP (text and vision towers, `clip` config) and the CLIP tokenizer in `folder`."""
    from transformers import CLIPConfig, CLIPModel

    folder = make_clip_text(folder, hidden, layers, heads, projection=True, seed=seed)
    text = json.loads((folder / "config.json").read_text())
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    text_config = {k: text[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id")}
    vision_config = {"hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": 1, "num_attention_heads": heads, "image_size": 8,
                     "patch_size": 4}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config,
                        projection_dim=hidden // 2)
    _seeded(seed)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _trained_tokenizer(byte_level: bool, specials: list[str], vocab_size: int):
    """A BPE from `tokenizers` trained on SENTENCES (byte-level for GPT-2, Metaspace for T5)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if byte_level:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def make_t5_encoder(folder: str | Path, d_model: int = 32, layers: int = 2, heads: int = 2,
                    seed: int = 0) -> Path:
    """A T5 encoder and a trained BPE tokenizer (`</s>` appended, `<pad>` = 0) in `folder`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _trained_tokenizer(False, ["<pad>", "</s>", "<unk>"], 200)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=backend.get_vocab_size(), d_model=d_model, d_kv=d_model // heads,
                      d_ff=2 * d_model, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    _seeded(seed)
    T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_decoder_lm(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A GPT-2 language model and a trained byte-level BPE without a pad token in `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _trained_tokenizer(True, ["<|endoftext|>"], 320)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    end = backend.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=backend.get_vocab_size(), n_embd=hidden, n_layer=layers,
                        n_head=2, n_positions=128, bos_token_id=end, eos_token_id=end)
    _seeded(seed)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_vision_model(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ViT image model in `folder` (config.json and weights, no tokenizer)."""
    from transformers import ViTConfig, ViTModel

    folder = Path(folder)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=8, patch_size=4)
    _seeded(seed)
    ViTModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


class StandInEncoder:
    """A deterministic stand-in for `FrozenTextEncoder` as the text cache uses it (fingerprint,
    max_length, encode); each caption's tokens are seeded from its text, one token per word.
    `delay` seconds are slept per `encode` call, to let concurrent processes overlap."""

    def __init__(self, fingerprint: str = "f" * 64, max_length: int = 8, dim: int = 4,
                 delay: float = 0.0) -> None:
        self.fingerprint = fingerprint
        self.delay = delay
        self.max_length = max_length
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, captions: list[str], batch_size: int = 64) -> list[TextEmbedding]:
        """Embeddings derived from each caption's sha256 (L = number of words, capped)."""
        self.calls.append(list(captions))
        time.sleep(self.delay)
        out = []
        for caption in captions:
            seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little")
            generator = torch.Generator().manual_seed(seed)
            length = min(len(caption.split()), self.max_length)
            tokens = torch.randn(length, self.dim, generator=generator)  # (L, D)
            pooled = torch.randn(self.dim, generator=generator)  # (D,)
            out.append(TextEmbedding(tokens.half(), pooled.half()))
        return out
