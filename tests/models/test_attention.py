import torch

from models.attention import Attention, RMSNorm, apply_rope, rope_2d


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
