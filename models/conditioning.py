"""What a DiT is conditioned on, as one value (`cond`) with its own "null".

A condition kind is a plain object that every part of the pipeline asks the same questions:
the data pipeline turns each sample's stored value into a batch (`batch`), the objective drops
the condition of some samples for classifier-free guidance (`drop`), guidance pairs each
sample with the null condition in one batched pass (`with_null`), sampling and the command line
build conditions from what a user asks for (`parse`), and exports record the kind (`to_json`).
The model embeds `cond` (`DiT.forward(x, t, cond)`), and `cond=None` means the null condition
for every sample. A new kind of condition (a caption) is a new class with these methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import Attention


class ClassCondition:
    """Class labels: `cond` is a LongTensor (B,) of class indices in 0..num_classes − 1.

    The null condition is the extra index `num_classes` (the model's label table has one row
    more than there are classes). A model trained without classes has `num_classes = 0`: every
    sample then carries the null label, and nothing is dropped or guided.
    """

    kind = "class"  # `names` label the classes for people (sub-folder names); indices if unknown

    def __init__(self, num_classes: int, names: Sequence[str] | None = None) -> None:
        if names is not None and len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]

    @property
    def null_index(self) -> int:
        """The label of the null (unconditional) class."""
        return self.num_classes

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The null condition for `batch` samples: (batch,) long."""
        return torch.full((batch,), self.null_index, dtype=torch.long, device=device)

    def batch(self, values: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The condition of samples whose stored values (record labels) are `values`: (B,)."""
        return torch.as_tensor(np.asarray(values, dtype=np.int64))

    def drop(self, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`cond` (B,) with the samples where `mask` (B,) bool is set replaced by the null."""
        return torch.where(mask, torch.full_like(cond, self.null_index), cond)

    def with_null(self, cond: torch.Tensor) -> torch.Tensor:
        """The batch `cond` followed by as many null conditions: (2B,), for guidance."""
        return torch.cat([cond, torch.full_like(cond, self.null_index)])

    def check(self, cond: torch.Tensor) -> None:
        """Refuse (ValueError) labels outside the model's classes (the null included)."""
        if self.num_classes == 0:
            raise ValueError("class labels given to a model trained without classes")
        if cond.numel() and not 0 <= int(cond.min()) <= int(cond.max()) < self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got "
                             f"{sorted(set(cond.tolist()))}")

    def parse(self, spec: str | None, count: int) -> torch.Tensor | None:
        """One label per sample from a command line's class (a name or an index), or every
        class in turn when `spec` is None; None for a model without classes (which refuses a
        class). ValueError names the choices."""
        if not self.num_classes:
            if spec is not None:
                raise ValueError(f"this model is unconditional (trained without classes); drop "
                                 f"--class-label {spec}")
            return None
        if spec is None:
            return self.batch([i % self.num_classes for i in range(count)])
        if spec in self.names:  # a name wins over an index that reads the same
            return self.batch([self.names.index(spec)] * count)
        if spec.lstrip("-").isdigit() and 0 <= int(spec) < self.num_classes:
            return self.batch([int(spec)] * count)
        shown = ", ".join(f"{i}={n}" for i, n in enumerate(self.names[:20]))
        more = f", ... ({self.num_classes} in all)" if self.num_classes > 20 else ""
        raise ValueError(f"unknown class {spec!r}; give a name or an index: {shown}{more}")

    def describe(self, cond: torch.Tensor, i: int) -> dict[str, Any]:
        """What sample i was conditioned on, for its PNG's text chunks."""
        label = int(cond[i])
        return {"class": self.names[label], "class_index": label}

    def to_json(self) -> dict[str, Any]:
        """Plain data for checkpoints and exports."""
        return {"kind": self.kind, "class_names": self.names}


class TextBatch:
    """A batch of captions as the DiT reads them: `tokens` (B, L) long byte ids (the built-in
    encoder's, `ByteTextEncoder` below) or (B, L, D) features of a frozen encoder, padded to the
    longest caption; `mask` (B, L) bool, True at real tokens; `pooled` (B, P) (a frozen CLIP's
    pooled output) or None; `texts` the captions themselves (for PNG metadata), or None.

    Sliced (`batch[a:b]`), moved (`.to`) and pinned like a tensor, so the samplers and the
    data pipeline treat it as they treat class labels.
    """

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor | None = None, texts: list[str] | None = None) -> None:
        self.tokens, self.mask, self.pooled, self.texts = tokens, mask, pooled, texts

    @classmethod
    def pad(cls, items: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
            texts: list[str] | None = None) -> TextBatch:
        """Stack captions given as (tokens (L_i,) or (L_i, D), pooled (P,) or None), padding
        with zeros to the longest (at least one position, masked when it is padding)."""
        longest = max([1] + [len(tokens) for tokens, _ in items])
        first = items[0][0]
        # Features in fp32 (a cache stores fp16): CPU autocast refuses to concatenate fp16
        # tensors, and the model casts them to its own dtype anyway.
        dtype = torch.float32 if first.is_floating_point() else first.dtype
        tokens = first.new_zeros((len(items), longest, *first.shape[1:]),
                                 dtype=dtype)  # (B, L[, D])
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for i, (row, _) in enumerate(items):
            tokens[i, :len(row)] = row
            mask[i, :len(row)] = True
        pooled = None
        if items[0][1] is not None:
            pooled = items[0][1].new_zeros((len(items), *items[0][1].shape),
                                           dtype=torch.float32)  # (B, P)
            for i, (_, row) in enumerate(items):
                pooled[i] = row
        return cls(tokens, mask, pooled, texts)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows: slice) -> TextBatch:
        return TextBatch(self.tokens[rows], self.mask[rows],
                         None if self.pooled is None else self.pooled[rows],
                         None if self.texts is None else self.texts[rows])

    def _map(self, fn) -> TextBatch:
        return TextBatch(fn(self.tokens), fn(self.mask),
                         None if self.pooled is None else fn(self.pooled), self.texts)

    def to(self, *args: Any, **kwargs: Any) -> TextBatch:
        """Moved to a device (floating tensors also to a dtype), as `Tensor.to`."""
        return self._map(lambda x: x.to(*args, **kwargs) if x.is_floating_point()
                         else x.to(*[a for a in args if not isinstance(a, torch.dtype)],
                                   **{k: v for k, v in kwargs.items() if k != "dtype"}))

    def pin_memory(self) -> TextBatch:
        """The batch in pinned memory (for asynchronous copies to a GPU)."""
        return self._map(lambda x: x.pin_memory())

    def padded(self, length: int) -> TextBatch:
        """The batch padded (masked) to `length` positions; at least its own length."""
        extra = length - self.tokens.shape[1]
        if extra <= 0:
            return self
        tokens = torch.cat([self.tokens, self.tokens.new_zeros(
            (len(self), extra, *self.tokens.shape[2:]))], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(len(self), extra)], dim=1)
        return TextBatch(tokens, mask, self.pooled, self.texts)

    def _aligned(self, other: TextBatch) -> tuple[TextBatch, TextBatch]:
        """This batch and `other`, both padded to the longer of the two."""
        length = max(self.tokens.shape[1], other.tokens.shape[1])
        return self.padded(length), other.padded(length)

    def where(self, rows: torch.Tensor, other: TextBatch) -> TextBatch:
        """This batch with the samples where `rows` (B,) bool is set taken from `other`."""
        a, b = self._aligned(other)
        pick = rows.view(-1, *[1] * (a.tokens.ndim - 1))  # (B, 1[, 1])
        texts = None if a.texts is None or b.texts is None else [
            y if r else x for x, y, r in zip(a.texts, b.texts, rows.tolist())]
        return TextBatch(torch.where(pick, b.tokens, a.tokens),
                         torch.where(rows[:, None], b.mask, a.mask),
                         None if a.pooled is None else torch.where(rows[:, None], b.pooled,
                                                                   a.pooled), texts)

    def cat(self, other: TextBatch) -> TextBatch:
        """This batch followed by `other`, padded to the longer of the two."""
        a, b = self._aligned(other)
        texts = None if a.texts is None or b.texts is None else a.texts + b.texts
        return TextBatch(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]),
                         None if a.pooled is None else torch.cat([a.pooled, b.pooled]), texts)


# captions -> one (tokens (L_i,) or (L_i, D), pooled (P,) or None) per caption
TextEncode = Callable[[list[str]], list[tuple[torch.Tensor, torch.Tensor | None]]]


class TextCondition:
    """Captions: `cond` is a `TextBatch`; the null condition is the empty caption "" (or, at
    sampling, a negative prompt: `negative`).

    `encode` turns captions into tokens: the built-in byte tokenizer (`ByteTextEncoder` below), a
    frozen encoder's cached embeddings while training (`training/text_cache.py`), or the
    frozen encoder itself at inference. `info` records the encoder for checkpoints and
    exports (`to_json`).
    """

    kind = "text"

    def __init__(self, encode: TextEncode, info: dict[str, Any] | None = None) -> None:
        self.encode, self.info = encode, dict(info or {})
        self.negative = ""  # what guidance pairs each prompt with

    def batch(self, captions: Sequence[str]) -> TextBatch:
        """The condition of samples whose captions are `captions`."""
        captions = list(captions)
        return TextBatch.pad(self.encode(captions), captions)

    def null(self, batch: int, device: torch.device | str | None = None) -> TextBatch:
        """The empty caption for `batch` samples."""
        return self.batch([""] * batch).to(device)

    def drop(self, cond: TextBatch, mask: torch.Tensor) -> TextBatch:
        """`cond` with the samples where `mask` (B,) bool is set given the empty caption."""
        return cond.where(mask, self.null(len(cond), cond.tokens.device))

    def with_null(self, cond: TextBatch) -> TextBatch:
        """The batch followed by as many `negative` prompts (the empty caption by default)."""
        other = self.batch([self.negative] * len(cond)).to(cond.tokens.device)
        return cond.cat(other)

    def check(self, cond: TextBatch) -> None:
        """Every caption is valid; nothing to refuse."""

    def parse(self, spec: str | None, count: int) -> TextBatch | None:
        """`count` samples of the prompt `spec`; None (unconditional) without one."""
        return None if spec is None else self.batch([spec] * count)

    def describe(self, cond: TextBatch, i: int) -> dict[str, Any]:
        """What sample i was conditioned on, for its PNG's text chunks."""
        out = {"prompt": cond.texts[i] if cond.texts is not None else ""}
        if self.negative:
            out["negative_prompt"] = self.negative
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for checkpoints and exports: the kind and the text encoder."""
        return {"kind": self.kind, "text_encoder": self.info}

# ----------------------------------------------------------------------------------------------
# The built-in text encoder: UTF-8 bytes through a small transformer trained with the DiT, so
# that text-to-image trains with nothing downloaded. A caption becomes its UTF-8 bytes after a
# begin token (`BOS`), cut at `max_length` tokens. The encoder is part of the DiT (`DiT.text`):
# it is trained, saved, averaged by the EMA and resumed with it, and its captions are never
# cached as embeddings (they change as it trains). A frozen Hugging Face encoder
# (`training/text_encoders.py`) replaces it when the run names one.

BYTE_VOCAB = 257  # the 256 byte values and the begin token
BOS = 256  # every caption starts with it, so even the empty caption has a token


def byte_tokens(caption: str, max_length: int) -> torch.Tensor:
    """The token ids (L,) long of `caption`: BOS then its UTF-8 bytes, at most `max_length`
    tokens in all (a multi-byte character may be cut; the model sees bytes, not characters)."""
    data = caption.encode("utf-8")[:max(0, max_length - 1)]
    return torch.tensor([BOS, *data], dtype=torch.long)


class TextBlock(nn.Module):
    """Pre-norm transformer block over text tokens: masked self-attention, then a GELU MLP."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)  # no rotation: learned positions
        self.norm2 = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, width), mask (B, L) bool -> (B, L, width)."""
        h = self.norm1(x)
        x = x + self.attn(h, mask=mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteTextEncoder(nn.Module):
    """Byte embeddings with learned positions, `depth` masked transformer blocks, a final norm.

    Padded positions (mask False) get outputs too, which the DiT masks out; every caption has
    its BOS token, so no row is padding alone.
    """

    def __init__(self, width: int, depth: int, num_heads: int, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(BYTE_VOCAB, width)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(TextBlock(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings and positions from N(0, 0.02²), as GPT-2; the linear layers keep the
        initialisation of whoever built the encoder (nn.Linear's, or the DiT's xavier)."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long (`byte_tokens`, padded), mask (B, L) bool -> (B, L, width)."""
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"{L} text tokens for a built-in encoder of at most "
                             f"{self.max_length}")
        x = self.embed(ids) + self.position[:L]  # (B, L, width)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


SPACES = (9, 10, 13, 32)  # the ASCII whitespace bytes that separate words
WORD_BYTES = 12  # a longer run of bytes without a space (a long word, CJK text) splits here


def pool_words(x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of each word's byte states: x (B, L, D), ids and mask (B, L) -> (B, W, D)
    and its mask (B, W), W the most words of a caption in the batch plus one for BOS.

    BOS is its own token; whitespace joins no word; a run of more than WORD_BYTES bytes
    without whitespace is cut into pieces of WORD_BYTES. Padding joins nothing, so the result
    does not depend on how far a batch is padded.
    """
    B, L = ids.shape
    space = torch.isin(ids, ids.new_tensor(SPACES))
    byte = mask & ~space & (ids != BOS)  # (B, L) bytes that belong to a word
    prev = torch.cat([ids.new_full((B, 1), 32), ids[:, :-1]], dim=1)
    starts_word = byte & (torch.isin(prev, ids.new_tensor(SPACES)) | (prev == BOS))
    index = torch.arange(L, device=ids.device).expand(B, L)
    first = torch.cummax(torch.where(starts_word, index, 0), dim=1).values
    starts = starts_word | (byte & ((index - first) % WORD_BYTES == 0))
    segment = torch.cumsum(starts.long(), dim=1) * byte  # (B, L): 1.. for words, 0 otherwise
    words = int(segment.max()) + 1 if L else 1  # on a GPU, one small sync per batch
    keep = byte.to(x.dtype)[..., None]  # (B, L, 1)
    sums = x.new_zeros(B, words, x.shape[-1]).scatter_add_(
        1, segment[..., None].expand_as(x), x * keep)  # (B, W, D)
    counts = keep.new_zeros(B, words, 1).scatter_add_(1, segment[..., None], keep)
    sums[:, 0] = x[:, 0]  # BOS, always valid
    counts[:, 0] = 1
    return sums / counts.clamp(min=1), counts[..., 0] > 0


def byte_condition(max_length: int) -> TextCondition:
    """The built-in encoder's condition: captions as byte tokens (`byte_tokens`), at most
    `max_length` a caption."""
    return TextCondition(lambda captions: [(byte_tokens(c, max_length), None) for c in captions],
                         {"kind": "builtin", "max_length": max_length})
