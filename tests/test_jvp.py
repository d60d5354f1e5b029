"""The forward-mode helper (stepdistill/jvp.py): exact against finite differences through attention, and the
default CPU SDPA kernel indeed lacks forward AD (the reason the helper pins the math kernel)."""
import pytest
import torch
import torch.nn.functional as F

from stepdistill.jvp import jvp


def _attention_block(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = (x @ w) * torch.cos(t)[:, None, None]
    q = h.unflatten(-1, (2, 4)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(-2) + torch.sin(t)[:, None, None] * x


def test_jvp_through_attention_matches_finite_differences():
    """float32, where the default CPU kernel is the flash one (no forward AD); the reference in float64."""
    g = torch.Generator().manual_seed(0)
    x, w, dx = (torch.randn(*shape, generator=g) for shape in ((2, 5, 8), (8, 8), (2, 5, 8)))
    t, dt = torch.tensor([0.3, 1.1]), torch.ones(2)
    out, tangent = jvp(lambda x, t: _attention_block(x, t, w), (x, t), (dx, dt))
    x64, t64, w64, dx64, dt64, h = x.double(), t.double(), w.double(), dx.double(), dt.double(), 1e-6
    numeric = (_attention_block(x64 + h * dx64, t64 + h * dt64, w64)
               - _attention_block(x64 - h * dx64, t64 - h * dt64, w64)) / (2 * h)
    assert torch.allclose(out, _attention_block(x, t, w))
    assert torch.allclose(tangent.double(), numeric, atol=1e-4)


def test_default_cpu_attention_kernel_has_no_forward_ad():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, q, q), (q,), (torch.ones_like(q),))


def test_jvp_needs_one_tangent_per_primal():
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(torch.sin, (torch.zeros(2),), ())
