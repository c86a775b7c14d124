"""The geodesic update (GEONORM.md section 2): invariants, guards, dtypes, gradients."""
import math

import pytest
import torch

import geonorm_fx as gf
from geonorm_fx.geodesic import R_FLOOR

from .reference import angle, reference_geodesic


def _pair(*shape, s_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), s_scale * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("s_scale", [1e-3, 0.1, 1.0, 10.0, 1e3])
def test_norm_is_preserved(s_scale):
    x, s = _pair(4, 7, 64, s_scale=s_scale)
    x = x * torch.logspace(-3, 3, 7).view(1, 7, 1)  # radii over six decades
    out = gf.geodesic_step(x, s, decay=1.0)
    assert out.dtype == torch.float32
    gap = (out.norm(dim=-1) - x.norm(dim=-1)).abs()
    assert (gap <= 1e-5 * x.norm(dim=-1)).all()


@pytest.mark.parametrize("decay,scale,bias", [(1.0, 1.0, 0.0), (0.5, 1.0, 0.0), (1 / 3, 2.0, 0.1),
                                              (1.0, -1.0, 0.0), (1.0, 1.0, 5.0)])
def test_angle_equals_clipped_angle(decay, scale, bias):
    clamp = math.pi / 4
    x, s = _pair(3, 5, 32, s_scale=0.7, seed=1)
    out = gf.geodesic_step(x, s, scale=scale, bias=bias, decay=decay, clamp=clamp)
    xd, sd = x.double(), s.double()
    v = sd - ((xd * sd).sum(-1, keepdim=True) / (xd * xd).sum(-1, keepdim=True)) * xd
    theta0 = (v.norm(dim=-1) / xd.norm(dim=-1)).clamp(max=clamp)
    expected = ((scale * theta0 + bias) * decay).clamp(-clamp, clamp).abs()
    torch.testing.assert_close(angle(x, out), expected, atol=2e-5, rtol=1e-4)


def test_equals_hand_written_reference():
    x, s = _pair(2, 9, 48, s_scale=0.5, seed=2)
    for decay in (1.0, 0.25):
        torch.testing.assert_close(gf.geodesic_step(x, s, decay=decay), reference_geodesic(x, s, decay=decay),
                                   atol=1e-5, rtol=1e-5)


def test_only_the_tangent_part_moves_the_state():
    x, s = _pair(2, 5, 32, seed=3)
    base = gf.geodesic_step(x, s)
    for c in (-3.0, 0.5, 7.0):
        torch.testing.assert_close(gf.geodesic_step(x, s + c * x), base, atol=1e-5, rtol=1e-5)


def test_update_parallel_to_the_state_keeps_the_state():
    x, _ = _pair(3, 4, 16, seed=4)
    for c in (2.0, -0.5):
        torch.testing.assert_close(gf.geodesic_step(x, c * x), x)


def test_zero_token_falls_back_to_plain_residual():
    x, s = _pair(2, 4, 16, seed=5)
    x[0, 1] = 0.0
    x[1, 3] = 1e-9
    out = gf.geodesic_step(x, s)
    torch.testing.assert_close(out[0, 1], s[0, 1])
    torch.testing.assert_close(out[1, 3], x[1, 3] + s[1, 3])
    ok = x.norm(dim=-1) >= R_FLOOR
    assert ((out.norm(dim=-1) - x.norm(dim=-1)).abs()[ok] <= 1e-5 * x.norm(dim=-1)[ok]).all()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_path_matches_reference_and_leaves_inputs_alone(mode):
    # Without autograd the step writes its output over its own tangent buffer: same values as the autograd
    # path and the reference, guards included, and neither input is touched.
    x, s = _pair(2, 9, 48, s_scale=0.5, seed=12)
    x[0, 1] = 0.0
    x[1, 2] = 0.0
    x[1, 2, 5] = 3.0
    s[1, 2] = -2.0 * x[1, 2]  # exactly parallel, v == 0 in float32: the guard returns x
    x_before, s_before = x.clone(), s.clone()
    update = gf.GeodesicUpdate(decay=0.25)
    with torch.no_grad():
        update.bias.fill_(0.1)
    taped = update(x, s)
    assert taped.requires_grad
    with mode():
        fast = update(x, s)
    torch.testing.assert_close(fast, taped.detach(), atol=1e-6, rtol=1e-6)
    ok = x.norm(dim=-1) >= R_FLOOR
    ok[1, 2] = False  # parallel: the reference divides by |v| = 0
    torch.testing.assert_close(fast[ok], reference_geodesic(x, s, decay=0.25, bias=0.1)[ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[0, 1], s[0, 1])
    torch.testing.assert_close(fast[1, 2], x[1, 2])
    assert torch.equal(x, x_before) and torch.equal(s, s_before)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs_compute_in_float32(dtype, tol):
    x, s = _pair(2, 6, 64, s_scale=0.3, seed=6)
    out = gf.geodesic_step(x.to(dtype), s.to(dtype), decay=0.5)
    assert out.dtype == dtype
    expected = reference_geodesic(x.to(dtype).float(), s.to(dtype).float(), decay=0.5)
    torch.testing.assert_close(out.float(), expected, atol=tol * 4, rtol=tol)
    gap = (out.float().norm(dim=-1) - x.to(dtype).float().norm(dim=-1)).abs()
    assert (gap <= tol * x.norm(dim=-1)).all()


def test_gradients_are_finite_at_the_guards():
    x, s = _pair(3, 16, seed=7)
    x = x.clone()
    x[0] = 0.0            # R < 1e-6: fallback x + s
    s = s.clone()
    s[1] = 2.5 * x[1]     # parallel: |v| < 1e-8
    x.requires_grad_(True)
    s.requires_grad_(True)
    update = gf.GeodesicUpdate(decay=0.5)
    update(x, s).pow(2).sum().backward()
    for t in (x.grad, s.grad, update.scale.grad, update.bias.grad):
        assert t is not None and torch.isfinite(t).all()
    torch.testing.assert_close(s.grad[0], 2 * s[0].detach())  # d/ds of |x + s|^2 at x = 0


def test_module_parameters_and_constants():
    learn = gf.GeodesicUpdate(decay=0.25, clamp=math.pi / 8)
    assert {n for n, _ in learn.named_parameters()} == {"scale", "bias"}
    assert learn.scale.item() == 1.0 and learn.bias.item() == 0.0
    fixed = gf.GeodesicUpdate(decay=0.25, learnable=False)
    assert list(fixed.parameters()) == []
    x, s = _pair(2, 3, 8, seed=8)
    torch.testing.assert_close(learn(x, s), gf.geodesic_step(x, s, decay=0.25, clamp=math.pi / 8))
    torch.testing.assert_close(fixed(x, s), gf.geodesic_step(x, s, decay=0.25))


def test_clamp_bounds_the_angle():
    x, s = _pair(4, 32, s_scale=100.0, seed=9)
    for clamp in (math.pi / 2, math.pi / 8):
        out = gf.geodesic_step(x, s, clamp=clamp, scale=10.0)
        assert (angle(x, out) <= clamp + 1e-5).all()


def test_bad_arguments_raise_geonorm_errors():
    with pytest.raises(gf.GeoNormError, match="same shape"):
        gf.geodesic_step(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(gf.GeoNormError, match="clamp"):
        gf.GeodesicUpdate(clamp=0.0)
    with pytest.raises(gf.GeoNormError, match="decay"):
        gf.GeodesicUpdate(decay=float("nan"))
    with pytest.raises(gf.GeoNormError, match="dim must be a negative int"):
        gf.GeodesicUpdate(dim=1)
