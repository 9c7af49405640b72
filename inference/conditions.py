"""What each sample is conditioned on, from the command line: a class or prompts.

The model's condition kind (`models/conditioning.py`, as `training/export.load_generator`
attaches it to the returned info) decides which flags apply; one a model cannot use is refused
with a one-line reason rather than ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped); ValueError when there are none."""
    path = Path(path)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompt in it (one prompt a line)")
    return prompts


def sample_conditions(info: Any, count: int, class_label: str | None = None,
                      prompt: str | None = None, prompts_file: str | None = None,
                      negative_prompt: str | None = None) -> Any:
    """The condition of `count` samples of the model `info` describes (a `GeneratorInfo`):
    `class_label` (None: every class in turn) for a class-conditional model; `prompt` or the
    lines of `prompts_file` (sample i takes prompt i mod lines) for a text-conditioned one,
    guided away from `negative_prompt` (default the empty caption). None samples an
    unconditional model. ValueError names a flag the model cannot use."""
    prompts = [prompt] if prompt is not None else None
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
    condition = info.condition
    if condition.kind == "text":
        if class_label is not None:
            raise ValueError(f"{info.source}: a text-conditioned model; give --prompt, not "
                             "--class-label")
        if prompts is None:
            raise ValueError(f"{info.source}: a text-conditioned model; give --prompt or "
                             "--prompts-file")
        condition.negative = negative_prompt or ""
        return condition.batch([prompts[i % len(prompts)] for i in range(count)])
    if prompts is not None or negative_prompt is not None:
        kind = "class-conditional" if info.num_classes else "unconditional"
        raise ValueError(f"{info.source}: a {kind} model, trained without captions; "
                         f"{'use --class-label' if info.num_classes else 'drop --prompt'}")
    return condition.parse(class_label, count)


def described(cond: Any, info: Any) -> dict[str, list[str]]:
    """The --json summary's record of what the samples were conditioned on."""
    if cond is None:
        return {"classes": []}
    if info.condition.kind == "text":
        return {"prompts": list(cond.texts)}
    return {"classes": [info.class_names[i] for i in cond.tolist()]}
