"""Conditions as one value with their own null: class labels."""

from __future__ import annotations

import pytest
import torch

from models.conditioning import ClassCondition

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
