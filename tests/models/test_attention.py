import math

import torch

from models.attention import Attention, RMSNorm, apply_rope, norm_rope, rope_2d


def test_attention_rmsnorm_matches_reference_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_attention_rope_preserves_norms():
    torch.manual_seed(0)
    cos, sin = rope_2d(5, 7, 32)
    assert cos.shape == sin.shape == (35, 32)
    x = torch.randn(2, 4, 35, 32)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_attention_rope_dot_product_depends_on_relative_position():
    torch.manual_seed(0)
    h, w, d = 9, 11, 16
    cos, sin = rope_2d(h, w, d, dtype=torch.float64)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(q_pos, k_pos):  # q at (row, col) against k at (row, col)
        iq, ik = q_pos[0] * w + q_pos[1], k_pos[0] * w + k_pos[1]
        return apply_rope(q, cos[iq], sin[iq]) @ apply_rope(k, cos[ik], sin[ik])

    base = score((1, 2), (3, 1))
    for offset in [(0, 3), (4, 0), (5, 7), (2, 5)]:
        shifted = score((1 + offset[0], 2 + offset[1]), (3 + offset[0], 1 + offset[1]))
        torch.testing.assert_close(shifted, base)
    # Rows and columns are both encoded: moving only one of them changes the score.
    assert not torch.isclose(score((1, 2), (3, 2)), base)
    assert not torch.isclose(score((1, 2), (2, 1)), base)


def test_attention_output_shape_on_non_square_grid():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4)
    h, w = 3, 10
    x = torch.randn(2, h * w, 64)
    out = attn(x, rope_2d(h, w, attn.head_dim))
    assert out.shape == (2, h * w, 64)
    assert torch.isfinite(out).all()


def swap_halves(t):
    return torch.cat((t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]), dim=-1)


def reference_norm_rope(x, weight, cos, sin, eps=1e-6):
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return x * cos + swap_halves(x) * sin


def test_attention_norm_rope_gradients_match_the_composition():
    torch.manual_seed(0)
    # The layout Attention uses: (B, N, 2, heads, hd) with per-(q/k, head) scales.
    x = torch.randn(2, 6, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t[:, None, None] for t in rope_2d(2, 3, 8, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: norm_rope(a, b, (cos, sin)), (x, weight))
    assert torch.autograd.gradcheck(lambda a, b: norm_rope(a, b), (x, weight))
    g = torch.randn(2, 6, 2, 3, 8, dtype=torch.float64)
    ours = torch.autograd.grad(norm_rope(x, weight, (cos, sin)), (x, weight), g)
    expected = torch.autograd.grad(reference_norm_rope(x, weight, cos, sin), (x, weight), g)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_attention_norm_rope_bf16_stays_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 2, 2, 32) * 3
    weight = torch.rand(2, 2, 32) + 0.5
    cos, sin = (t[:, None, None] for t in rope_2d(4, 4, 32))
    g = torch.randn_like(x)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        y = norm_rope(xd, wd, (cos.to(dtype), sin.to(dtype)))
        assert y.dtype == dtype
        results.append((y, *torch.autograd.grad(y, (xd, wd), g.to(dtype))))
    for full, half in zip(*results):  # output, x's and weight's gradients
        assert (half.float() - full).norm() / full.norm() < 1e-2


def reference_attention(attn, x, rope):
    """Textbook multi-head attention with the same weights: heads first, explicit softmax."""
    B, N, C = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, N, hd) each
    cos, sin = rope
    q = reference_norm_rope(q, attn.q_norm.weight, cos, sin)
    k = reference_norm_rope(k, attn.k_norm.weight, cos, sin)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(dim=-1)  # (B, H, N, N)
    return attn.proj((scores @ v).transpose(1, 2).reshape(B, N, C))


def test_attention_matches_textbook_attention_and_its_gradients():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    h, w = 3, 5
    x = torch.randn(2, h * w, 32, dtype=torch.float64, requires_grad=True)
    rope = rope_2d(h, w, attn.head_dim, dtype=torch.float64)
    params = [x, *attn.parameters()]
    g = torch.randn(2, h * w, 32, dtype=torch.float64)
    ours = attn(x, rope)
    expected = reference_attention(attn, x, rope)
    torch.testing.assert_close(ours, expected)
    for a, b in zip(torch.autograd.grad(ours, params, g),
                    torch.autograd.grad(expected, params, g), strict=True):
        torch.testing.assert_close(a, b)


def test_attention_norm_rope_compiled_matches_the_autograd_node():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 3, 8, requires_grad=True)
    weight = torch.rand(2, 3, 8) + 0.5
    weight.requires_grad_()
    rope = tuple(t[:, None, None] for t in rope_2d(2, 3, 8))
    g = torch.randn(2, 6, 2, 3, 8)
    compiled = torch.compile(norm_rope, fullgraph=True)  # traces the plain composition
    results = []
    for fn in (norm_rope, compiled):
        y = fn(x, weight, rope)
        results.append((y, *torch.autograd.grad(y, (x, weight), g)))
    for eager, traced in zip(*results):  # output, x's and weight's gradients
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)


def test_attention_rope_tables_rotate_rows_then_columns() -> None:
    # Pins the layout saved checkpoints depend on: of each half of a head, the first quarter of
    # the pairs turns with the token's row, the second with its column (row-major tokens).
    from models.attention import ROPE_BASE

    h, w, d = 3, 5, 16
    cos, sin = rope_2d(h, w, d, dtype=torch.float64)
    freqs = ROPE_BASE ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    r, c = 2, 1
    angles = torch.cat((r * freqs, c * freqs))  # (D/2,)
    torch.testing.assert_close(cos[r * w + c], torch.cat((angles.cos(), angles.cos())))
    torch.testing.assert_close(sin[r * w + c], torch.cat((-angles.sin(), angles.sin())))
