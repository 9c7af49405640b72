"""SDPA against attention written as two batched matmuls around a softmax: speed and accuracy.

Why `models/attention.py` calls `F.scaled_dot_product_attention` on every device. For each dtype
and token count it times, alternately and by medians, the forward alone (no grad) and forward +
backward of each form on the same (batch, heads, tokens, 64) q, k, v:

    sdpa:    F.scaled_dot_product_attention(q, k, v)     (flash kernel on CPU and CUDA)
    matmul:  softmax(q k^T / sqrt(64)) v                  (bmm, softmax, bmm in the input dtype)
    matmul32: the same with the logits and softmax in fp32 and the probabilities rounded to the
             input dtype for the second bmm and kept for backward (`SavedProbsAttention`)

and measures each output's error against the exact (fp64) attention of the same rounded inputs,
as ||out - exact|| / ||exact||, with logits of standard deviation about 1 and 4 (QK-normalised q
and k at initialisation give about 1; learned norm scales make them larger). `speedup` is
sdpa time / matmul time (`speedup32`: / matmul32 time), above 1 when the matmuls are faster.

In bf16 the matmul form rounds the logits to bf16 before the softmax, where the flash kernel
keeps them in fp32 and rounds only the probabilities; the `error_*` fields show what that costs.
matmul32 rounds where the flash kernel does, so its errors match SDPA's; unlike the flash kernel
it keeps the (batch, heads, tokens, tokens) probabilities for backward instead of recomputing
them, which is where its speed comes from and what it costs in memory (`matmul32_saved_mb`).
The last line printed is one JSON object.

    UV_CACHE_DIR=.uv-cache uv run python bench/attention.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEAD_DIM = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for (B, heads, N, D) inputs, in their dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
    return scores.softmax(-1) @ v


class SavedProbsAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D)) v with fp32 logits, keeping the rounded probabilities P.

    With dO the output gradient: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)),
    dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
    """

    @staticmethod
    def forward(ctx, q, k, v):
        """q, k, v: (B, heads, N, D) in one dtype; returns (B, heads, N, D)."""
        stats = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        scores = (q.to(stats) * q.shape[-1] ** -0.5) @ k.to(stats).transpose(-2, -1)  # (B,h,N,N)
        probs = scores.softmax(-1).to(v.dtype)
        ctx.save_for_backward(q, k, v, probs)
        return probs @ v

    @staticmethod
    def backward(ctx, grad):
        """The gradients of the class docstring, the softmax part accumulated in fp32."""
        q, k, v, probs = ctx.saved_tensors
        grad_v = probs.transpose(-2, -1) @ grad
        grad_probs = grad @ v.transpose(-2, -1)  # (B, heads, N, N)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_scores = grad_scores * q.shape[-1] ** -0.5
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v


def matmul32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`SavedProbsAttention` for (B, heads, N, D) inputs."""
    return SavedProbsAttention.apply(q, k, v)


FORMS = {"sdpa": F.scaled_dot_product_attention, "matmul": matmul_attention,
         "matmul32": matmul32_attention}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(dtype: torch.dtype, tokens: int, logit_std: float, seed: int) -> dict:
    """Errors of each form against fp64 attention of the same rounded inputs."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, tokens, HEAD_DIM, generator=gen, dtype=torch.float64)
               for _ in range(3))
    q = (q * logit_std).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())

    def error(out: torch.Tensor) -> float:
        return float((out.double() - exact).norm() / exact.norm())

    return {name: error(fn(q, k, v)) for name, fn in FORMS.items()}


def bench_row(dtype_name: str, batch: int, heads: int, tokens: int, repeats: int,
              seed: int) -> dict:
    """Times and errors of each form for one dtype and shape."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, HEAD_DIM, generator=gen).to(dtype)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(batch, heads, tokens, HEAD_DIM, generator=gen).to(dtype)
    forms = FORMS
    times: dict[str, dict[str, list[float]]] = {name: {"fwd": [], "train": []} for name in forms}
    order = list(forms)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = forms[name]

            def forward(fn=fn) -> None:
                with torch.no_grad():
                    fn(q, k, v)

            def train(fn=fn) -> None:
                fn(q, k, v).backward(grad)

            times[name]["fwd"].append(median_seconds(forward, 3))
            times[name]["train"].append(median_seconds(train, 3))
    med = {name: {kind: statistics.median(ts) for kind, ts in kinds.items()}
           for name, kinds in times.items()}
    row = {"dtype": dtype_name, "batch": batch, "heads": heads, "tokens": tokens,
           "head_dim": HEAD_DIM}
    for kind in ("fwd", "train"):
        for name in forms:
            row[f"{name}_{kind}_ms"] = round(1e3 * med[name][kind], 2)
        row[f"speedup_{kind}"] = round(med["sdpa"][kind] / med["matmul"][kind], 3)
        row[f"speedup32_{kind}"] = round(med["sdpa"][kind] / med["matmul32"][kind], 3)
    # what matmul32 keeps for backward beyond SDPA (which keeps one fp32 value per query row)
    row["matmul32_saved_mb"] = round(batch * heads * tokens * tokens * q.element_size() / 1e6, 1)
    for std in (1.0, 4.0):
        errors = relative_error(dtype, tokens, std, seed)
        for name, err in errors.items():
            row[f"error_{name}_logit_std{std:g}"] = float(f"{err:.3g}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 1024],
                        help="sequence lengths (a 32x32 latent with patch 2 is 256 tokens)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=6, help="dit-s/2 has 6 heads of 64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for dtype_name in args.dtypes:
        for tokens in args.tokens:
            # keep the work per row about equal: fewer samples for long sequences
            batch = max(1, args.batch * 256 // max(tokens, 256))
            row = bench_row(dtype_name, batch, args.heads, tokens, args.repeats, args.seed)
            print(json.dumps(row), flush=True)
            results.append(row)
    print(json.dumps({"bench": "attention", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
