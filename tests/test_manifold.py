"""The operations of :class:`psi_geoopt.PSIManifold` against the spec (PSI_GEOMETRY.md §2-§3).

Every formula is recomputed here on a matrix with one row per group, on random shapes of
rank 1..4, any group axis (negative and ``None`` included) and per-group scales spanning many
orders of magnitude (float64). Errors are measured per group, relative to the group's scale.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from conftest import (
    Case,
    assert_groups_close,
    cases,
    group_matrix,
    group_norms,
    group_shape,
    ungroup,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from psi_geoopt import PSIManifold

PROPERTY = settings(max_examples=40, deadline=None)
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- row-wise reference


def rows(case: Case, t: torch.Tensor) -> torch.Tensor:
    return group_matrix(t, case.dim)


def unrows(case: Case, matrix: torch.Tensor) -> torch.Tensor:
    return ungroup(matrix, case.shape, case.dim)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1, keepdim=True)


def row_norm(a: torch.Tensor) -> torch.Tensor:
    return a.norm(dim=1, keepdim=True)


def safe_unit(a: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero."""
    return a / row_norm(a).clamp_min(torch.finfo(a.dtype).tiny)


def per_group_values(case: Case, column: torch.Tensor) -> torch.Tensor:
    """A ``(groups, 1)`` column as the manifold returns it with ``keepdim=False``."""
    return column.reshape(()) if case.dim is None else column.reshape(-1)


def horizontal_with_angle(case: Case, x: torch.Tensor, offset: int, max_angle: float):
    r"""A horizontal vector with :math:`\|u\|_g` uniform in ``[0, max_angle)`` per group.

    Groups of size one have no horizontal direction and get zero.
    """
    direction = safe_unit(rows(case, case.horizontal(x, offset)))
    angles = max_angle * torch.rand(
        direction.shape[0], 1, generator=case.generator(offset + 100), dtype=x.dtype
    )
    return unrows(case, direction * angles * row_norm(rows(case, x)))


def psi_objective(case: Case, x: torch.Tensor) -> torch.Tensor:
    """A smooth loss that depends on the rays of the groups only (PSI)."""
    unit = rows(case, x) / row_norm(rows(case, x))
    weights = rows(case, case.gaussian(50))
    return (weights * unit).sum() + (unit**3 * weights.flip(1)).sum()


def euclidean_gradient(case: Case, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(psi_objective(case, x), x)
    return gradient


# ---------------------------------------------------------------------- groups


@PROPERTY
@given(cases())
def test_groups_are_those_of_weight_norm(case):
    """Groups, norms and the keepdim shape agree with ``torch.norm_except_dim``.

    torch's ``weight_norm`` spells "whole tensor" as ``dim=-1``; PSIManifold spells it
    ``None`` and reads negative values as axes counted from the end.
    """
    x = case.point()
    torch_dim = -1 if case.dim is None else case.dim % len(case.shape)
    reference = torch.norm_except_dim(x, 2, torch_dim)
    unit = case.manifold.origin(case.shape, dtype=x.dtype)
    norms = case.manifold.norm(unit, x, keepdim=True)
    assert norms.shape == group_shape(case.shape, case.dim)
    torch.testing.assert_close(norms, reference.expand(norms.shape), rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    ("module", "dim", "groups"),
    [
        (torch.nn.Linear(6, 5, bias=False), 0, 5),
        (torch.nn.Conv1d(3, 4, 3), 0, 4),
        (torch.nn.Conv2d(3, 4, 3), 0, 4),
        (torch.nn.Conv3d(2, 3, 2), 0, 3),
        (torch.nn.ConvTranspose2d(3, 5, 3), 1, 5),
        (torch.nn.Conv2d(4, 8, 3, groups=4), 0, 8),  # depthwise: weight (8, 1, 3, 3)
        (torch.nn.Conv2d(4, 4, 3, groups=4), -4, 4),
        (torch.nn.Linear(6, 5, bias=False), None, 1),
    ],
)
def test_layer_weights_group_like_weight_norm(module, dim, groups):
    """One group per output channel, as torch's weight-norm parametrization sees them."""
    torch.manual_seed(0)
    weight = module.weight.detach().double()
    manifold = PSIManifold(dim=dim)
    torch_dim = -1 if dim is None else dim % weight.dim()
    magnitude = torch.nn.utils.parametrizations.weight_norm(module, dim=torch_dim)
    magnitude = magnitude.parametrizations.weight.original0.detach().double()
    unit = manifold.origin(weight.shape, dtype=torch.float64)
    norms = manifold.norm(unit, weight, keepdim=True)
    assert norms.numel() == groups
    torch.testing.assert_close(norms, magnitude.expand(norms.shape), rtol=1e-6, atol=0)
    step = manifold.retr(weight, manifold.proju(weight, torch.randn_like(weight)))
    torch.testing.assert_close(
        torch.norm_except_dim(step, 2, torch_dim), torch.norm_except_dim(weight, 2, torch_dim)
    )


# ---------------------------------------------------------------------- metric


@PROPERTY
@given(cases())
def test_inner_and_norm(case):
    r""":math:`g_w(u, v) = \langle u, v\rangle / r^2`, one value per group; ``norm`` its root."""
    manifold, x = case.manifold, case.point()
    u, v = case.vector(x, 1), case.vector(x, 2)
    w, a, b = rows(case, x), rows(case, u), rows(case, v)
    expected = row_dot(a, b) / row_norm(w) ** 2
    scale = row_norm(a) * row_norm(b) / row_norm(w) ** 2
    inner = manifold.inner(x, u, v)
    assert inner.shape == (() if case.dim is None else (case.n_groups,))
    assert inner.dtype == torch.float64
    assert torch.all(
        (inner - per_group_values(case, expected)).abs() <= 1e-12 * per_group_values(case, scale)
    )
    kept = manifold.inner(x, u, v, keepdim=True)
    assert kept.shape == group_shape(case.shape, case.dim)
    torch.testing.assert_close(kept.reshape(-1), inner.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(manifold.inner(x, v, u), inner, rtol=1e-14, atol=0)
    torch.testing.assert_close(manifold.inner(x, u), manifold.inner(x, u, u), rtol=0, atol=0)
    norm = manifold.norm(x, u)
    torch.testing.assert_close(norm, manifold.inner(x, u).sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        norm, per_group_values(case, row_norm(a) / row_norm(w)), rtol=1e-13, atol=0
    )
    assert manifold.norm(x, u, keepdim=True).shape == group_shape(case.shape, case.dim)


@PROPERTY
@given(cases())
def test_inner_is_invariant_and_component_inner_is_inner_keepdim(case):
    manifold, x = case.manifold, case.point()
    u, v = case.vector(x, 1), case.vector(x, 2)
    scale = case.scales(3, decades=6)
    torch.testing.assert_close(
        manifold.inner(scale * x, scale * u, scale * v),
        manifold.inner(x, u, v),
        rtol=1e-12,
        atol=1e-300,
    )
    component = manifold.component_inner(x, u, v)
    assert torch.broadcast_shapes(component.shape, x.shape) == x.shape
    torch.testing.assert_close(component, manifold.inner(x, u, v, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(
        manifold.component_inner(scale * x, scale * u),
        manifold.component_inner(x, u),
        rtol=1e-12,
        atol=1e-300,
    )


# ---------------------------------------------------------------------- projections


@PROPERTY
@given(cases())
def test_proju_formula_idempotent_and_kills_the_vertical(case):
    manifold, x = case.manifold, case.point()
    u = case.vector(x)
    w, a = rows(case, x), rows(case, u)
    w_unit = w / row_norm(w)
    expected = unrows(case, a - row_dot(a, w_unit) * w_unit)
    projected = manifold.proju(x, u)
    assert_groups_close(projected, expected, case.dim, scale=group_norms(u, case.dim), rtol=1e-13)
    assert_groups_close(
        manifold.proju(x, projected),
        projected,
        case.dim,
        scale=group_norms(u, case.dim),
        rtol=1e-13,
    )
    assert_groups_close(
        manifold.proju(x, x),
        torch.zeros_like(x),
        case.dim,
        scale=group_norms(x, case.dim),
        rtol=1e-14,
    )
    mixed = case.scales(4, decades=2) * x + projected
    assert_groups_close(
        manifold.proju(x, mixed),
        projected,
        case.dim,
        scale=group_norms(mixed, case.dim),
        rtol=1e-13,
    )


@PROPERTY
@given(cases())
def test_projx_is_the_identity_on_points(case):
    x = case.point()
    assert case.manifold.projx(x) is x
    assert case.manifold.check_point_on_manifold(x)
    assert case.manifold.check_point(x, explain=True) == (True, None)


@PROPERTY
@given(cases())
def test_egrad2rgrad_formula_and_sphere_gradient_norm(case):
    r""":math:`\operatorname{grad} f = r^2 \operatorname{proj}_w \nabla f`; its g-norm is the
    norm of the sphere gradient at :math:`\hat w` (geoopt's ``Sphere`` as the reference)."""
    manifold, x = case.manifold, case.point()
    gradient = euclidean_gradient(case, x)
    w, g = rows(case, x), rows(case, gradient)
    radius = row_norm(w)
    w_unit = w / radius
    expected = radius**2 * (g - row_dot(g, w_unit) * w_unit)
    rgrad = manifold.egrad2rgrad(x, gradient)
    scale = group_norms(x, case.dim) ** 2 * group_norms(gradient, case.dim)
    assert_groups_close(rgrad, unrows(case, expected), case.dim, scale=scale, rtol=1e-12)
    torch.testing.assert_close(rgrad, group_norms(x, case.dim) ** 2 * manifold.proju(x, gradient))
    # the gradient of f at the unit representative is r * gradient (PSI: grad f(cw) = grad f(w)/c)
    sphere_gradient = geoopt.Sphere().egrad2rgrad(w_unit, radius * g)
    torch.testing.assert_close(
        manifold.norm(x, rgrad),
        per_group_values(case, row_norm(sphere_gradient)),
        rtol=1e-10,
        atol=1e-12 * float(row_norm(radius * g).max()),
    )


# ---------------------------------------------------------------------- maps


@PROPERTY
@given(cases())
def test_retr_formula_norm_identity_and_first_order(case):
    manifold, x = case.manifold, case.point()
    u = case.vector(x)
    w, a = rows(case, x), rows(case, u)
    expected = row_norm(w) * (w + a) / row_norm(w + a)
    step = manifold.retr(x, u)
    assert_groups_close(step, unrows(case, expected), case.dim, rtol=1e-13)
    assert_groups_close(group_norms(step, case.dim), group_norms(x, case.dim), case.dim, rtol=1e-14)
    assert_groups_close(manifold.retr(x, torch.zeros_like(x)), x, case.dim, rtol=1e-15)
    # first order: ||retr(x, t h) - x - t h|| <= t^2 ||h||^2 / (2 r) for horizontal h
    h = horizontal_with_angle(case, x, 5, 1.0)
    radius, h_norm = group_norms(x, case.dim), group_norms(h, case.dim)
    for t in (1e-2, 1e-3):
        remainder = manifold.retr(x, t * h) - x - t * h
        bound = 0.5 * t**2 * h_norm**2 / radius * (1 + 1e-6) + 1e-14 * radius
        assert bool((group_norms(remainder, case.dim) <= bound).all())
    # and the finite-difference quotient converges to h linearly in t
    quotients = [(manifold.retr(x, t * h) - x) / t for t in (1e-3, 1e-4)]
    errors = [group_norms(q - h, case.dim) for q in quotients]
    assert bool((errors[1] <= 0.2 * errors[0] + 1e-10 * radius).all())


@PROPERTY
@given(cases())
def test_expmap_formula_great_circle_and_dist(case):
    manifold, x = case.manifold, case.point()
    u = horizontal_with_angle(case, x, 1, 3.0)
    w, a = rows(case, x), rows(case, u)
    radius = row_norm(w)
    theta = row_norm(a) / radius
    expected = torch.cos(theta) * w + torch.sin(theta) * radius * safe_unit(a)
    moved = manifold.expmap(x, u)
    assert_groups_close(moved, unrows(case, expected), case.dim, rtol=1e-13)
    # on the great circle through w with direction u, at the same radius
    m = rows(case, moved)
    in_plane = row_dot(m, w / radius) * w / radius + row_dot(m, safe_unit(a)) * safe_unit(a)
    assert_groups_close(unrows(case, in_plane), moved, case.dim, rtol=1e-13)
    assert_groups_close(
        group_norms(moved, case.dim), group_norms(x, case.dim), case.dim, rtol=1e-13
    )
    torch.testing.assert_close(manifold.dist(x, moved), manifold.norm(x, u), rtol=1e-9, atol=1e-12)
    assert_groups_close(manifold.expmap(x, torch.zeros_like(x)), x, case.dim, rtol=0)


@PROPERTY
@given(cases())
def test_logmap_formula_inverse_of_expmap_and_horizontal(case):
    manifold, x, y = case.manifold, case.point(0), case.point(1)
    w, z = rows(case, x), rows(case, y)
    radius = row_norm(w)
    w_unit, z_unit = w / radius, z / row_norm(z)
    cosine = row_dot(z_unit, w_unit)
    p = z_unit - cosine * w_unit
    angle = torch.atan2(row_norm(p), cosine)
    expected = radius * angle * safe_unit(p)
    log = manifold.logmap(x, y)
    assert_groups_close(
        log, unrows(case, expected), case.dim, scale=group_norms(x, case.dim), rtol=1e-12
    )
    # horizontal, of g-norm the distance, and a function of the ray of y only
    radial = row_dot(rows(case, log), w_unit).abs()
    assert bool((radial <= 1e-12 * radius).all())
    # away from the cut locus (antipodal rays, where zero is returned), g-norm = distance
    regular = angle < math.pi - 0.05
    torch.testing.assert_close(
        rows(case, manifold.norm(x, log, keepdim=True).expand(case.shape))[:, :1][regular],
        rows(case, manifold.dist(x, y, keepdim=True).expand(case.shape))[:, :1][regular],
        rtol=1e-12,
        atol=1e-12,
    )
    assert_groups_close(
        manifold.logmap(x, case.scales(2, decades=6) * y),
        log,
        case.dim,
        scale=group_norms(x, case.dim),
        rtol=1e-12,
    )
    # Exp(Log(y)) is the ray of y at x's radius
    back = rows(case, manifold.expmap(x, log))
    error = row_norm(back - radius * z_unit)
    assert bool((error[regular] <= 1e-9 * radius[regular]).all())
    # Log(Exp(u)) = u inside the injectivity radius
    u = horizontal_with_angle(case, x, 3, 3.0)
    assert_groups_close(
        manifold.logmap(x, manifold.expmap(x, u)),
        u,
        case.dim,
        scale=group_norms(x, case.dim),
        rtol=1e-9,
    )


@PROPERTY
@given(cases())
def test_dist_is_the_angle_between_rays(case):
    manifold, x, y = case.manifold, case.point(0), case.point(1)
    w_unit, z_unit = safe_unit(rows(case, x)), safe_unit(rows(case, y))
    # 2 atan2(|a - b|, |a + b|) is the angle between unit a and b, accurate at 0 and pi
    angle = 2 * torch.atan2(row_norm(w_unit - z_unit), row_norm(w_unit + z_unit))
    dist = manifold.dist(x, y)
    torch.testing.assert_close(dist, per_group_values(case, angle), rtol=1e-12, atol=1e-12)
    assert bool(((dist >= 0) & (dist <= math.pi)).all())
    torch.testing.assert_close(manifold.dist(y, x), dist, rtol=1e-12, atol=1e-12)
    s, t = case.scales(2, decades=6), case.scales(3, decades=6)
    torch.testing.assert_close(manifold.dist(s * x, t * y), dist, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(manifold.dist(x, s * x), torch.zeros_like(dist), rtol=0, atol=1e-7)
    torch.testing.assert_close(manifold.dist(x, -x), torch.full_like(dist, math.pi))
    assert manifold.dist(x, y, keepdim=True).shape == group_shape(case.shape, case.dim)


@PROPERTY
@given(cases())
def test_transp_formula_horizontal_and_equivariant(case):
    manifold, x, y = case.manifold, case.point(0), case.point(1)
    v = case.vector(x, 2)
    w, z, a = rows(case, x), rows(case, y), rows(case, v)
    z_unit = z / row_norm(z)
    expected = row_norm(z) / row_norm(w) * (a - row_dot(a, z_unit) * z_unit)
    moved = manifold.transp(x, y, v)
    scale = group_norms(y, case.dim) / group_norms(x, case.dim) * group_norms(v, case.dim)
    assert_groups_close(moved, unrows(case, expected), case.dim, scale=scale, rtol=1e-13)
    radial = row_dot(rows(case, moved), z_unit).abs()
    assert bool((radial <= 1e-13 * rows(case, scale.expand(case.shape))[:, :1]).all())
    a_scale, b_scale = case.scales(3, decades=6), case.scales(4, decades=6)
    assert_groups_close(
        manifold.transp(a_scale * x, b_scale * y, a_scale * v),
        b_scale * moved,
        case.dim,
        scale=b_scale * scale,
        rtol=1e-12,
    )
    h = case.horizontal(x, 5)
    assert_groups_close(
        manifold.transp(x, x, h),
        h,
        case.dim,
        scale=group_norms(case.vector(x, 5), case.dim),
        rtol=1e-13,
    )


@PROPERTY
@given(cases())
def test_combined_maps_agree_with_map_then_transp(case):
    manifold, x = case.manifold, case.point()
    u, v = case.horizontal(x, 1), case.horizontal(x, 2)
    norms = group_norms(v, case.dim) + group_norms(x, case.dim) * 1e-300
    y, moved = manifold.retr_transp(x, u, v)
    assert_groups_close(y, manifold.retr(x, u), case.dim, rtol=1e-14)
    assert_groups_close(
        moved, manifold.transp(x, manifold.retr(x, u), v), case.dim, scale=norms, rtol=1e-13
    )
    assert_groups_close(
        manifold.transp_follow_retr(x, u, v), moved, case.dim, scale=norms, rtol=1e-13
    )
    y, moved = manifold.expmap_transp(x, u, v)
    assert_groups_close(y, manifold.expmap(x, u), case.dim, rtol=1e-14)
    assert_groups_close(moved, manifold.transp(x, y, v), case.dim, scale=norms, rtol=1e-13)
    assert_groups_close(
        manifold.transp_follow_expmap(x, u, v), moved, case.dim, scale=norms, rtol=1e-13
    )


# ---------------------------------------------------------------------- equivariance


def _equivariance_pairs(case: Case, name: str):
    """``(left, right, scale)`` for the relation of ``name`` under per-group rescalings S, T.

    ``scale`` is the size of the terms that make up the result (results can cancel to ~0).
    """
    manifold, x, y = case.manifold, case.point(0), case.point(1)
    u, v = case.vector(x, 2), case.vector(x, 3)
    h = horizontal_with_angle(case, x, 4, 3.0)
    s, t = case.scales(5, decades=6), case.scales(6, decades=6)
    radius, size_u, size_v = (group_norms(a, case.dim) for a in (x, u, v))
    if name == "proju":
        return [
            (manifold.proju(s * x, s * u), s * manifold.proju(x, u), s * size_u),
            (manifold.proju(s * x, u), manifold.proju(x, u), size_u),
        ]
    if name == "egrad2rgrad":
        gradient = euclidean_gradient(case, x)
        left = manifold.egrad2rgrad(s * x, euclidean_gradient(case, s * x))
        right = s * manifold.egrad2rgrad(x, gradient)
        return [(left, right, s * radius**2 * group_norms(gradient, case.dim))]
    if name == "retr":
        return [(manifold.retr(s * x, s * u), s * manifold.retr(x, u), s * radius)]
    if name == "expmap":
        return [(manifold.expmap(s * x, s * h), s * manifold.expmap(x, h), s * radius)]
    if name == "logmap":
        return [(manifold.logmap(s * x, t * y), s * manifold.logmap(x, y), s * radius)]
    if name == "transp":
        left = manifold.transp(s * x, t * y, s * v)
        right = t * manifold.transp(x, y, v)
        return [(left, right, t * group_norms(y, case.dim) / radius * size_v)]
    if name in ("retr_transp", "expmap_transp"):
        step = u if name == "retr_transp" else h
        left = getattr(manifold, name)(s * x, s * step, s * v)
        right = getattr(manifold, name)(x, step, v)
        return [(left[0], s * right[0], s * radius), (left[1], s * right[1], s * size_v)]
    if name in ("transp_follow_retr", "transp_follow_expmap"):
        step = u if name == "transp_follow_retr" else h
        left = getattr(manifold, name)(s * x, s * step, s * v)
        return [(left, s * getattr(manifold, name)(x, step, v), s * size_v)]
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "proju",
        "egrad2rgrad",
        "retr",
        "expmap",
        "logmap",
        "transp",
        "retr_transp",
        "expmap_transp",
        "transp_follow_retr",
        "transp_follow_expmap",
    ],
)
@PROPERTY
@given(case=cases())
def test_every_map_commutes_with_per_group_rescaling(name, case):
    for left, right, scale in _equivariance_pairs(case, name):
        assert_groups_close(left, right, case.dim, scale=scale, rtol=1e-11)


@PROPERTY
@given(cases())
def test_scalar_quantities_are_invariant(case):
    manifold, x, y = case.manifold, case.point(0), case.point(1)
    u = case.vector(x, 2)
    s, t = case.scales(5, decades=6), case.scales(6, decades=6)
    torch.testing.assert_close(manifold.norm(s * x, s * u), manifold.norm(x, u), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        manifold.dist(s * x, t * y), manifold.dist(x, y), rtol=1e-12, atol=1e-12
    )
    assert manifold.check_vector_on_tangent(s * x, s * manifold.proju(x, u))


# ---------------------------------------------------------------------- geoopt conventions


@PROPERTY
@given(cases())
def test_tangent_checks_accept_horizontal_and_explain_the_rest(case):
    manifold, x = case.manifold, case.point()
    assert manifold.check_point_on_manifold(x, explain=True) == (True, None)
    assert manifold.check_vector_on_tangent(x, case.horizontal(x), explain=True) == (True, None)
    manifold.assert_check_vector_on_tangent(x, case.horizontal(x))
    ok, reason = manifold.check_vector_on_tangent(x, x, explain=True)
    assert not ok
    assert "horizontal" in reason
    with pytest.raises(ValueError, match="horizontal"):
        manifold.assert_check_vector_on_tangent(x, x)


@pytest.mark.parametrize("vector_shape", [(1, 4), (4,), (1, 1), ()])
def test_vectors_broadcast_against_the_point(vector_shape):
    manifold = PSIManifold(dim=0)
    torch.manual_seed(1)
    x = torch.randn(3, 4, dtype=torch.float64)
    u = torch.randn(vector_shape, dtype=torch.float64)
    v = torch.randn(vector_shape, dtype=torch.float64)
    full_u, full_v = u.expand_as(x), v.expand_as(x)
    for name in ("proju", "egrad2rgrad", "retr", "inner", "norm", "component_inner"):
        torch.testing.assert_close(
            getattr(manifold, name)(x, u), getattr(manifold, name)(x, full_u)
        )
    torch.testing.assert_close(manifold.inner(x, u, v), manifold.inner(x, full_u, full_v))
    torch.testing.assert_close(manifold.transp(x, x + 1, v), manifold.transp(x, x + 1, full_v))
    for left, right in zip(
        manifold.retr_transp(x, u, v), manifold.retr_transp(x, full_u, full_v), strict=True
    ):
        torch.testing.assert_close(left, right)
    assert manifold.check_vector_on_tangent(x, u) == manifold.check_vector_on_tangent(x, full_u)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m, x, bad: m.proju(x, bad), "u"),
        (lambda m, x, bad: m.egrad2rgrad(x, bad), "u"),
        (lambda m, x, bad: m.retr(x, bad), "u"),
        (lambda m, x, bad: m.expmap(x, bad), "u"),
        (lambda m, x, bad: m.inner(x, bad), "u"),
        (lambda m, x, bad: m.inner(x, x, bad), "v"),
        (lambda m, x, bad: m.norm(x, bad), "u"),
        (lambda m, x, bad: m.logmap(x, bad), "y"),
        (lambda m, x, bad: m.dist(x, bad), "y"),
        (lambda m, x, bad: m.transp(x, bad, x), "y"),
        (lambda m, x, bad: m.transp(x, x, bad), "v"),
        (lambda m, x, bad: m.retr_transp(x, x, bad), "v"),
    ],
)
@pytest.mark.parametrize("bad_shape", [(3, 5), (2, 3, 4), (5,)])
def test_vector_that_does_not_broadcast_is_named(call, name, bad_shape):
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(PSIManifold(dim=0), x, torch.ones(bad_shape, dtype=torch.float64))


# ---------------------------------------------------------------------- sampling and repr


@PROPERTY
@given(cases(), st.sampled_from([torch.float32, torch.float64]))
def test_random_and_origin_are_valid_unit_points(case, dtype):
    manifold = case.manifold
    for point in (
        manifold.random(case.shape, dtype=dtype),
        manifold.origin(*case.shape, dtype=dtype),
    ):
        assert isinstance(point, geoopt.ManifoldTensor)
        assert point.manifold is manifold
        assert point.shape == case.shape and point.dtype == dtype
        assert manifold.check_point_on_manifold(point)
        torch.testing.assert_close(
            group_norms(point, case.dim), torch.ones(group_shape(case.shape, case.dim), dtype=dtype)
        )
    assert torch.equal(
        manifold.origin(case.shape, dtype=dtype), manifold.origin(case.shape, dtype=dtype)
    )


def test_random_is_not_constant():
    manifold = PSIManifold(dim=0)
    assert not torch.equal(manifold.random(4, 5), manifold.random(4, 5))


@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_extra_repr(dim):
    manifold = PSIManifold(dim=dim)
    assert manifold.extra_repr() == f"dim={dim}"
    assert repr(manifold) == f"PSI(dim={dim}) manifold"


# ---------------------------------------------------------------------- low precision


LOW_PRECISION_OPERATIONS = {
    "proju": lambda m, x, u, y, g: m.proju(x, u),
    "egrad2rgrad": lambda m, x, u, y, g: m.egrad2rgrad(x, g),
    "retr": lambda m, x, u, y, g: m.retr(x, u),
    "expmap": lambda m, x, u, y, g: m.expmap(x, m.proju(x, u)),
    "logmap": lambda m, x, u, y, g: m.logmap(x, y),
    "transp": lambda m, x, u, y, g: m.transp(x, y, u),
    "retr_transp": lambda m, x, u, y, g: m.retr_transp(x, u, y)[1],
    "inner": lambda m, x, u, y, g: m.inner(x, u, keepdim=True),
    "norm": lambda m, x, u, y, g: m.norm(x, u, keepdim=True),
    "dist": lambda m, x, u, y, g: m.dist(x, y, keepdim=True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOW_PRECISION_OPERATIONS)
def test_low_precision_is_computed_in_float32(dtype, name):
    """float16/bfloat16 in, same dtype out, as close to the float32 result as the dtype allows.

    Groups of norm ~1e3 square to ~1e6, past float16's range: the reductions must not overflow.
    """
    manifold = PSIManifold(dim=0)
    generator = torch.Generator().manual_seed(2)
    scales = torch.tensor([[1e-2], [1.0], [3e2]])
    x = (torch.randn(3, 8, generator=generator) * scales).to(dtype)
    u = (torch.randn(3, 8, generator=generator) * scales).to(dtype)
    y = (torch.randn(3, 8, generator=generator) * scales).to(dtype)
    gradient = (torch.randn(3, 8, generator=generator) / scales).to(dtype)  # PSI: ~ 1 / r
    operation = LOW_PRECISION_OPERATIONS[name]
    result = operation(manifold, x, u, y, gradient)
    reference = operation(manifold, *(t.float() for t in (x, u, y, gradient)))
    assert result.dtype == dtype
    assert bool(result.isfinite().all())
    eps = torch.finfo(dtype).eps
    error = group_matrix((result.float() - reference).expand(3, 8), 0).abs().amax(dim=1)
    size = group_matrix(reference.expand(3, 8), 0).abs().amax(dim=1)
    assert bool((error <= 2 * eps * size + 1e-30).all()), (error, size)
    low_random = manifold.random(3, 8, dtype=dtype)
    assert low_random.dtype == dtype and manifold.check_point_on_manifold(low_random)


# ---------------------------------------------------------------------- batches (geoopt's ndim)


@pytest.mark.parametrize(
    ("dim", "ndim", "point", "group_axes"),
    [
        (None, 1, (10,), (-1,)),
        (0, 2, (5, 4), (-1,)),
        (-1, 2, (5, 4), (-2,)),
        (1, 4, (3, 4, 2, 2), (-4, -2, -1)),
        (None, 3, (2, 3, 4), (-3, -2, -1)),
    ],
)
@pytest.mark.parametrize("batch", [(), (6,), (2, 3)], ids=str)
def test_batched_points_are_grouped_within_each_point(dim, ndim, point, group_axes, batch):
    """With ``ndim`` the groups of each point are its slices along ``dim``; per-group values
    have shape ``(*batch, groups)`` (``(*batch,)`` for ``dim=None``) and, kept, broadcast."""
    manifold = PSIManifold(dim, ndim=ndim)
    generator = torch.Generator().manual_seed(0)
    x, u = (torch.randn(*batch, *point, generator=generator, dtype=torch.float64) for _ in "xu")
    expected = (u * u).sum(group_axes, keepdim=True) / (x * x).sum(group_axes, keepdim=True)
    kept = manifold.inner(x, u, keepdim=True)
    torch.testing.assert_close(kept, expected, rtol=1e-13, atol=0)
    groups = () if dim is None else (point[dim],)
    assert manifold.inner(x, u).shape == (*batch, *groups)
    assert manifold.dist(x, u).shape == (*batch, *groups)
    assert manifold.norm(x, u, keepdim=True).shape == expected.shape
    torch.testing.assert_close(manifold.inner(x, u).reshape(-1), kept.reshape(-1))
    step = manifold.retr(x, manifold.proju(x, u))
    torch.testing.assert_close(
        torch.linalg.vector_norm(step, dim=group_axes), torch.linalg.vector_norm(x, dim=group_axes)
    )


@pytest.mark.parametrize(
    ("point", "vector"),
    [((5, 4), (3, 5, 4)), ((3, 5, 4), (5, 4)), ((1, 5, 4), (3, 1, 5, 4)), ((3, 5, 4), (1, 4))],
    ids=str,
)
def test_batch_dimensions_broadcast_like_torch(point, vector):
    """Batch dimensions broadcast in both directions; a vector may also broadcast within the
    point, as for ``ndim=None``."""
    manifold = PSIManifold(0, ndim=2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(point, generator=generator, dtype=torch.float64)
    u = torch.randn(vector, generator=generator, dtype=torch.float64)
    shape = torch.broadcast_shapes(point, vector)
    full_x, full_u = x.expand(shape), u.expand(shape)
    for name in ("proju", "egrad2rgrad", "retr", "expmap", "inner", "norm", "component_inner"):
        torch.testing.assert_close(
            getattr(manifold, name)(x, u), getattr(manifold, name)(full_x, full_u)
        )
    torch.testing.assert_close(
        manifold.transp(x, x + u, u), manifold.transp(full_x, full_x + full_u, full_u)
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m, x, bad: m.proju(x, bad), "u"),
        (lambda m, x, bad: m.inner(x, x, bad), "v"),
        (lambda m, x, bad: m.dist(x, bad), "y"),
        (lambda m, x, bad: m.transp(x, bad, x), "y"),
        (lambda m, x, bad: m.retr_transp(x, x, bad), "v"),
    ],
)
@pytest.mark.parametrize("bad_shape", [(3, 5, 5), (2, 5, 4), (4, 1, 5), (10,)], ids=str)
def test_batched_vector_that_does_not_fit_the_point_is_named(call, name, bad_shape):
    """Only batch dimensions broadcast: a vector that would change the point's shape (or whose
    batch does not broadcast) is refused, naming it."""
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"`{name}` of shape .* does not broadcast against"):
        call(PSIManifold(0, ndim=2), x, torch.ones(bad_shape, dtype=torch.float64))


def test_ndim_is_carried_by_repr_copies_pickles_and_state_dicts():
    import copy
    import io
    import pickle

    manifold = PSIManifold(dim=-1, ndim=2)
    assert manifold.extra_repr() == "dim=-1, ndim=2"
    assert repr(manifold) == "PSI(dim=-1, ndim=2) manifold"
    assert manifold.ndim == 2 and PSIManifold(dim=0).ndim is None
    for clone in (copy.deepcopy(manifold), pickle.loads(pickle.dumps(manifold))):
        assert (clone.dim, clone.ndim) == (-1, 2)
    parameter = geoopt.ManifoldParameter(torch.randn(3, 5, 4), manifold=manifold)
    for clone in (copy.deepcopy(parameter), pickle.loads(pickle.dumps(parameter))):
        assert (clone.manifold.dim, clone.manifold.ndim) == (-1, 2)
        assert torch.equal(clone, parameter)

    module = torch.nn.Module()
    module.manifold = manifold
    module.weight = parameter
    state = module.state_dict()
    assert state["manifold._extra_state"] == {"dim": -1, "ndim": 2}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    same = torch.nn.Module()
    same.manifold = PSIManifold(dim=-1, ndim=2)
    same.weight = geoopt.ManifoldParameter(torch.ones(3, 5, 4), manifold=same.manifold)
    same.load_state_dict(torch.load(buffer))
    assert torch.equal(same.weight, parameter) and same.weight.manifold.ndim == 2
    other = torch.nn.Module()
    other.manifold = PSIManifold(dim=-1)
    other.weight = torch.nn.Parameter(torch.ones(3, 5, 4))
    with pytest.raises(ValueError, match=r"saved from PSI\(dim=-1, ndim=2\) manifold"):
        other.load_state_dict(state)


def test_a_model_state_dict_is_unchanged():
    """``ManifoldParameter`` holds the manifold as an attribute, not a submodule: converted
    models keep their state_dict keys."""
    layer = torch.nn.Linear(3, 4, bias=False)
    layer.weight = geoopt.ManifoldParameter(layer.weight.detach(), manifold=PSIManifold(0))
    assert list(layer.state_dict()) == ["weight"]


HOST_SYNCHRONIZATIONS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")


class _RecordOperations(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("dim", "ndim"), [(0, None), (None, None), (1, 2), (None, 1)])
def test_operations_never_read_values_on_the_host(dim, ndim):
    """No operation (``projx`` included: geoopt's ``RiemannianAdam`` calls it every step)
    reads a value back, which on an accelerator would wait for the device."""
    manifold = PSIManifold(dim, ndim=ndim)
    generator = torch.Generator().manual_seed(3)
    x, y, u, v = (torch.randn(4, 3, 5, generator=generator) for _ in range(4))
    with _RecordOperations() as recorded:
        manifold.projx(x)
        for name in ("inner", "norm", "component_inner", "proju", "egrad2rgrad", "retr", "expmap"):
            getattr(manifold, name)(x, u)
        manifold.logmap(x, y)
        manifold.dist(x, y)
        manifold.transp(x, y, v)
        manifold.retr_transp(x, u, v)
        manifold.expmap_transp(x, u, v)
    reads = {n for n in recorded.names if n.split(".")[0] in HOST_SYNCHRONIZATIONS}
    assert len(recorded.names) > 10 and not reads, reads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_retr_keeps_the_norm_of_a_step_that_lands_near_the_origin(dtype):
    """A step that is not horizontal can bring ``w + u`` close to 0 (here a one-element group
    whose sign flips, ``|w + u| = |w| / 100``): the kept norm is exact to rounding, not to
    ``|w| / |w + u|`` roundings."""
    x = torch.tensor([0.2398, -0.9717], dtype=dtype)
    u = torch.tensor([0.2937, 0.9814], dtype=dtype)
    step = PSIManifold(dim=0).retr(x, u)
    assert torch.equal(step.sign(), (x + u).sign())
    torch.testing.assert_close(step.abs(), x.abs(), rtol=2 * torch.finfo(dtype).eps, atol=0)
