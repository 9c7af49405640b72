"""Conditions as one value with their own null: class labels and captions (the built-in byte
encoder, and the text-conditioned DiT's joint attention)."""

from __future__ import annotations

import pytest
import torch

from models.conditioning import (BOS, ByteTextEncoder, ClassCondition, TextBatch, TextCondition,
                                 byte_tokens, pool_words)
from models.dit import DiT, DiTConfig

CLASSES = ["checkers", "clouds", "discs", "stripes"]


def test_conditioning_class_labels_by_name_index_or_cycle() -> None:
    condition = ClassCondition(4, CLASSES)
    assert condition.parse(None, 6).tolist() == [0, 1, 2, 3, 0, 1]
    assert condition.parse("discs", 2).tolist() == [2, 2]
    assert condition.parse("3", 1).tolist() == [3]
    assert ClassCondition(2, ["0", "1"]).parse("1", 1).tolist() == [1]  # a name wins
    assert ClassCondition(0).parse(None, 3) is None
    with pytest.raises(ValueError, match="unconditional"):
        ClassCondition(0).parse("0", 1)
    for bad in ("4", "-1", "dogs"):
        with pytest.raises(ValueError, match="0=checkers"):
            condition.parse(bad, 1)


def test_conditioning_class_null_drop_and_guidance_pairs() -> None:
    condition = ClassCondition(4, CLASSES)
    cond = torch.tensor([0, 3, 2])
    assert condition.null(2).tolist() == [4, 4]  # the extra row of the label table
    assert condition.drop(cond, torch.tensor([True, False, True])).tolist() == [4, 3, 4]
    assert condition.with_null(cond).tolist() == [0, 3, 2, 4, 4, 4]
    assert condition.describe(cond, 1) == {"class": "stripes", "class_index": 3}
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.3"):
        condition.check(torch.tensor([4]))
    with pytest.raises(ValueError, match="names for"):
        ClassCondition(3, CLASSES)


def _text_dit(seed: int = 0, **fields) -> DiT:
    torch.manual_seed(seed)
    config = dict(hidden_size=32, depth=2, num_heads=2, text="builtin", text_max_length=40)
    model = DiT(DiTConfig(**{**config, **fields}))
    with torch.no_grad():  # trained-looking weights: zero-initialised parts would hide bugs
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_conditioning_text_byte_tokens_start_with_bos_and_cut_at_max_length() -> None:
    assert byte_tokens("", 8).tolist() == [BOS]
    assert byte_tokens("ab", 8).tolist() == [BOS, 97, 98]
    assert byte_tokens("é", 8).tolist() == [BOS, 0xC3, 0xA9]  # UTF-8 bytes, not characters
    assert len(byte_tokens("x" * 100, 8)) == 8


def test_conditioning_text_encoder_ignores_padding() -> None:
    torch.manual_seed(0)
    encoder = ByteTextEncoder(16, 2, 2, 32).eval()
    ids = byte_tokens("red disc", 32)[None]  # (1, L)
    alone = encoder(ids, torch.ones_like(ids, dtype=torch.bool))
    padded = TextBatch.pad([(ids[0], None), (byte_tokens("a much longer caption", 32), None)])
    both = encoder(padded.tokens, padded.mask)
    torch.testing.assert_close(both[0, :ids.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_conditioning_text_words_are_the_mean_of_their_bytes() -> None:
    caption = "two  red\tdiscs " + "x" * 14  # runs of spaces and a tab; a 14-byte "word"
    ids = byte_tokens(caption, 64)[None]  # (1, L)
    states = torch.arange(ids.shape[1], dtype=torch.float32)[None, :, None]  # state = position
    words, mask = pool_words(states, ids, torch.ones_like(ids, dtype=torch.bool))
    # BOS at 0; "two" 1-3, "red" 6-8, "discs" 10-14, then 12 + 2 bytes of x at 16-27, 28-29
    assert words[0, :, 0].tolist() == [0, 2, 7, 12, 21.5, 28.5] and mask.all()
    empty, empty_mask = pool_words(states[:, :1], ids[:, :1], torch.ones(1, 1, dtype=torch.bool))
    assert empty.shape == (1, 1, 1) and empty_mask.tolist() == [[True]]  # BOS alone


@pytest.mark.parametrize("tokens", ["words", "bytes"])
def test_conditioning_text_dit_padding_never_changes_the_output(tokens: str) -> None:
    """The same caption padded to two lengths (as two max_lengths or batch-mates would) gives
    the same velocity."""
    model = _text_dit(text_tokens=tokens)
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    cond = model.condition.batch(["three yellow discs"])
    v = model(x, t, cond)
    for length in (cond.tokens.shape[1] + 1, 39):
        torch.testing.assert_close(model(x, t, cond.padded(length)), v, atol=1e-5, rtol=1e-5)


def test_conditioning_text_dit_follows_the_caption_and_the_null_is_empty() -> None:
    model = _text_dit()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    a = model(x, t, model.condition.batch(["red stripes", "red stripes"]))
    b = model(x, t, model.condition.batch(["blue checkers", "red stripes"]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    torch.testing.assert_close(model(x, t, None), model(x, t, model.condition.batch(["", ""])))


def test_conditioning_text_dit_trains_its_encoder_and_gradients_reach_it() -> None:
    model = _text_dit().train()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    model(x, t, model.condition.batch(["a", "bc"])).square().mean().backward()
    assert model.text.embed.weight.grad.abs().sum() > 0
    assert model.text_register.grad.abs().sum() > 0


def test_conditioning_text_dit_frozen_features_with_pooled_output() -> None:
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, text="frozen", text_dim=12,
                          text_pooled_dim=6))
    table = {"a": (torch.randn(3, 12).half(), torch.randn(6).half()),
             "": (torch.randn(2, 12).half(), torch.randn(6).half())}
    model.condition = TextCondition(lambda caps: [table[c] for c in caps])
    cond = model.condition.batch(["a", ""])
    assert cond.tokens.shape == (2, 3, 12) and cond.mask.sum(1).tolist() == [3, 2]
    assert cond.pooled.shape == (2, 6)
    assert model(torch.randn(2, 4, 4, 4), torch.rand(2), cond).shape == (2, 4, 4, 4)


def test_conditioning_text_dit_refuses_classes_with_text_and_a_frozen_model_without_width() -> None:
    with pytest.raises(ValueError, match="classes or on text"):
        DiTConfig(hidden_size=32, depth=1, num_heads=2, text="builtin", text_max_length=8,
                  num_classes=3)
    with pytest.raises(ValueError, match="text_dim"):
        DiTConfig(hidden_size=32, depth=1, num_heads=2, text="frozen")


def test_conditioning_text_condition_drop_guidance_pairs_and_slices() -> None:
    condition = _text_dit().condition
    cond = condition.batch(["red", "a longer green caption", "x"])
    dropped = condition.drop(cond, torch.tensor([True, False, True]))
    assert dropped.texts == ["", "a longer green caption", ""]
    assert dropped.mask.sum(1).tolist() == [1, 23, 1]  # BOS alone for the empty caption
    condition.negative = "blurry"
    paired = condition.with_null(cond)
    assert len(paired) == 6 and paired.texts[3:] == ["blurry"] * 3
    assert paired[1:2].texts == ["a longer green caption"]
    moved = cond.to("cpu", torch.float64)
    assert moved.tokens.dtype == torch.long and moved.mask.dtype == torch.bool
    assert condition.describe(cond, 1)["prompt"] == "a longer green caption"


def test_conditioning_text_dit_configs_saved_before_word_pooling_load_as_bytes() -> None:
    new = DiTConfig(hidden_size=32, depth=2, num_heads=2, text="builtin", text_max_length=40)
    assert new.text_tokens == "words" and DiTConfig.from_dict(new.to_dict()) == new
    old = {k: v for k, v in new.to_dict().items() if k != "text_tokens"}
    assert DiTConfig.from_dict(old).text_tokens == "bytes"
    # the two read the same caption differently: loading one as the other would be wrong
    words, bytes_ = _text_dit(), _text_dit(text_tokens="bytes")
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    cond = words.condition.batch(["three yellow discs"])
    assert not torch.allclose(words(x, t, cond), bytes_(x, t, cond), atol=1e-3)
    with pytest.raises(ValueError, match="text_tokens"):
        DiTConfig(**{**old, "text_tokens": "chars"})
