"""Training step cost of text conditioning against class conditioning, at equal model size.

For each model size and precision, one full training step (the rectified-flow loss with its
condition dropout, backward, fused AdamW) of the same DiT conditioned three ways, timed in turn
(the order rotates every repeat) and summarised by medians:

- `class`: class labels (the peer: ratio = class step time / this step time, 1 = as fast);
- `builtin`: captions through the built-in byte encoder, which trains with the DiT (its forward
  and backward are part of every step), one token per word (`DiTConfig.text_tokens`);
- `builtin_bytes`: the same with every byte state a token (the models before word pooling);
- `frozen`: a frozen encoder's cached token features (`--frozen-dim`, e.g. 768 for CLIP-L,
  4096 for T5-XXL) read from memory, as training reads the text cache: the encoder itself
  costs nothing per step, only the joint attention over its tokens.

Captions are the synthetic set's (`training/synthetic.py`, about 40 bytes; the frozen
features get one token per word plus two). The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/text_step.py --models dit-xs/2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python bench/text_step.py`
    sys.path.insert(0, str(REPO))

from bench.train import DTYPES, parse_latent, timed  # noqa: E402
from models.conditioning import TextCondition  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.registry import dit_config  # noqa: E402
from training.flow import RectifiedFlow  # noqa: E402
from training.synthetic import caption, draw_params  # noqa: E402

KINDS = ("class", "builtin", "builtin_bytes", "frozen")


def build(kind: str, name: str, channels: int, frozen_dim: int, max_length: int,
          depth: int, seed: int) -> DiT:
    """The named DiT conditioned on classes (4), built-in captions or frozen features."""
    torch.manual_seed(seed)
    fields = {"class": {"num_classes": 4},
              "builtin": {"text": "builtin", "text_max_length": max_length,
                          "text_depth": depth},
              "builtin_bytes": {"text": "builtin", "text_max_length": max_length,
                                "text_depth": depth, "text_tokens": "bytes"},
              "frozen": {"text": "frozen", "text_dim": frozen_dim}}[kind]
    model = DiT(dit_config(name, channels, **fields))
    if kind == "frozen":  # a feature table standing in for the text cache
        table: dict[str, torch.Tensor] = {}

        def cached(captions: list[str]) -> list:
            for c in captions:
                if c not in table:
                    words = len(c.split()) + 2  # begin and end tokens
                    table[c] = torch.randn(words, frozen_dim).half()
            return [(table[c], None) for c in captions]

        model.condition = TextCondition(cached)
    return model


def make_step(model: DiT, kind: str, batch: int, height: int, width: int,
              dtype: torch.dtype, seed: int):
    """One training step on a fixed batch of latents and conditions."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    flow = RectifiedFlow(model.condition, model.config.patch_size)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, model.config.in_channels, height, width, generator=gen)
    captions = [caption(draw_params(seed, i)) for i in range(batch)]
    autocast = dtype != torch.float32

    def step() -> None:
        # the condition is built every step, as the prefetcher does
        cond = (model.condition.batch([i % 4 for i in range(batch)]) if kind == "class"
                else model.condition.batch(captions))
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = flow.loss(model, x0, cond, generator=gen).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    """Time every (model, precision) and print the table, then the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dit-xs/2"])
    parser.add_argument("--latent", type=parse_latent, default="16x16",
                        help="latent WIDTHxHEIGHT (16x16: the quickstart's 128 px)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16, help="latent channels")
    parser.add_argument("--frozen-dim", type=int, default=768)
    parser.add_argument("--max-length", type=int, default=120)
    parser.add_argument("--text-depth", type=int, default=1, help="built-in encoder blocks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = args.latent
    rows = []
    for name in args.models:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            steps = {}
            for kind in KINDS:
                model = build(kind, name, args.channels, args.frozen_dim, args.max_length,
                              args.text_depth, args.seed)
                steps[kind] = make_step(model, kind, args.batch, height, width, dtype,
                                        args.seed)
                steps[kind]()  # warm-up: first-step allocations, AdamW state
            times = {kind: [] for kind in KINDS}
            for r in range(args.repeats):
                order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
                for kind in order:
                    times[kind].append(timed(steps[kind], args.steps, torch.device("cpu")))
            median = {kind: statistics.median(v) for kind, v in times.items()}
            row = {"model": name, "dtype": dtype_name, "latent": f"{width}x{height}",
                   "batch": args.batch,
                   **{f"{k}_samples_per_s": round(args.batch / median[k], 2) for k in KINDS},
                   "builtin_over_class": round(median["class"] / median["builtin"], 3),
                   "builtin_bytes_over_class": round(median["class"] / median["builtin_bytes"],
                                                     3),
                   "frozen_over_class": round(median["class"] / median["frozen"], 3)}
            rows.append(row)
            print(f"{name} {dtype_name}: class {row['class_samples_per_s']} samples/s, "
                  f"builtin {row['builtin_samples_per_s']} ({row['builtin_over_class']}x), "
                  f"builtin bytes {row['builtin_bytes_samples_per_s']} "
                  f"({row['builtin_bytes_over_class']}x), "
                  f"frozen {row['frozen_samples_per_s']} ({row['frozen_over_class']}x)",
                  file=sys.stderr, flush=True)
    print(json.dumps({"bench": "text_step", "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "frozen_dim": args.frozen_dim,
                      "rows": rows}))


if __name__ == "__main__":
    main()
