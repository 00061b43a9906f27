"""PSIManifold against geoopt's generic manifold contract, stated once and run on every spec.

geoopt's own ``tests/test_manifold_basic.py`` checks every manifold the same way: a point and
a projected vector are fixed by the projections (``test_projection_identity``,
``test_projection_via_assert``, ``test_vector_projection_via_assert``), and stacking copies of
a point along a new leading axis stacks the answers (``test_broadcast_projx``,
``test_broadcast_proju``, ``test_broadcast_retr``, ``test_broadcast_transp``, ``test_logmap``;
``test_reversibility`` is skipped for manifolds that are not reversible, like ``Sphere``). The
contract is written here once and run over PSI specs ``(dim, ndim, point shape)`` the way
geoopt adds ``Sphere``, then extended: distinct stacked points for every operation, a point
against stacked vectors and the reverse, ``ndim=None`` as the same manifold on one point, and
geoopt's idioms (``Sphere`` on unit rows, ``ProductManifold``, ``Scaled``,
``RiemannianLineSearch``, the samplers). Float64 throughout.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import geoopt
import numpy as np
import pytest
import torch
from conftest import group_matrix, group_shape, ungroup

import psi_geoopt.optim
from psi_geoopt import PSIManifold

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64


@dataclass(frozen=True)
class Spec:
    """A PSI manifold in geoopt's convention: groups along ``dim`` of points of ``shape``."""

    dim: int | None
    ndim: int
    shape: tuple[int, ...]
    scale: float | None = None  # wrapped in geoopt.Scaled

    @property
    def manifold(self) -> geoopt.Manifold:
        psi = PSIManifold(self.dim, ndim=self.ndim)
        return psi if self.scale is None else geoopt.Scaled(psi, self.scale)

    def __str__(self) -> str:
        scaled = "" if self.scale is None else f"-scaled{self.scale}"
        return f"dim={self.dim}-ndim={self.ndim}-{'x'.join(map(str, self.shape))}{scaled}"

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def point(self, batch: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
        """Points whose groups have norms spread over four orders of magnitude."""
        generator = self.generator(seed)
        x = torch.randn(*batch, *self.shape, generator=generator, dtype=DTYPE)
        exponents = torch.rand(*batch, *group_shape(self.shape, self.dim), generator=generator)
        return x * 10 ** (4 * exponents.to(DTYPE) - 2)

    def vector(self, batch: tuple[int, ...] = (), seed: int = 1) -> torch.Tensor:
        return torch.randn(*batch, *self.shape, generator=self.generator(seed), dtype=DTYPE)


SPECS = [
    Spec(None, 1, (10,)),  # rows on the sphere
    Spec(0, 2, (5, 10)),  # one group per row of a matrix (a Linear weight)
    Spec(-1, 2, (5, 10)),  # one group per column
    Spec(None, 2, (5, 4)),  # one group per matrix
    Spec(0, 4, (4, 3, 3, 3)),  # conv weights (out, in, k, k)
    Spec(1, 4, (3, 4, 3, 3)),  # ConvTranspose weights: output channels on axis 1
    Spec(None, 1, (10,), scale=2.0),  # geoopt.Scaled around rows
]


PSI_SPECS = [spec for spec in SPECS if spec.scale is None]


@pytest.fixture(params=SPECS, ids=str)
def spec(request) -> Spec:
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-11) -> None:
    """Close relative to the size of the expected tensor (entries may cancel to ~0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    size = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * size)


def unstack(spec: Spec, t: torch.Tensor) -> list[torch.Tensor]:
    return list(t) if t.dim() > len(spec.shape) else [t] * 4


# ---------------------------------------------------------------------- geoopt's checks


def test_projection_identity(spec):
    x = spec.point()
    assert_close(spec.manifold.projx(x), x)


def test_projection_via_assert(spec):
    """Any representative with non-zero groups is a point: ``projx`` keeps it."""
    ex = spec.point(seed=3)
    px = spec.manifold.projx(ex)
    spec.manifold.assert_check_point_on_manifold(px)
    assert_close(px, ex)


def test_vector_projection_via_assert(spec):
    """``proju`` against the projection computed here, group by group."""
    x, ev = spec.point(), spec.vector()
    pv = spec.manifold.proju(x, ev)
    spec.manifold.assert_check_vector_on_tangent(x, pv)
    w, u = group_matrix(x, spec.dim), group_matrix(ev, spec.dim)
    w_unit = w / w.norm(dim=1, keepdim=True)
    v = u - (u * w_unit).sum(dim=1, keepdim=True) * w_unit
    assert_close(pv, ungroup(v, spec.shape, spec.dim))


def test_broadcast_projx(spec):
    manifold = spec.manifold
    stack = torch.stack([spec.point()] * 4)
    projected = manifold.projx(stack)
    manifold.assert_check_point_on_manifold(projected)
    for x, px in zip(stack, projected, strict=True):
        manifold.assert_check_point_on_manifold(px)
        assert_close(px, manifold.projx(x))


def test_broadcast_proju(spec):
    manifold = spec.manifold
    points = torch.stack([spec.point()] * 4)
    vectors = torch.stack([spec.vector()] * 4)
    projected = manifold.proju(points, vectors)
    manifold.assert_check_vector_on_tangent(points, projected)
    for x, u, pu in zip(points, vectors, projected, strict=True):
        manifold.assert_check_vector_on_tangent(x, pu)
        assert_close(pu, manifold.proju(x, u))


def test_broadcast_retr(spec):
    manifold = spec.manifold
    points = torch.stack([spec.point()] * 4)
    vectors = manifold.proju(points, torch.stack([spec.vector()] * 4))
    moved = manifold.retr(points, vectors)
    manifold.assert_check_point_on_manifold(moved)
    for x, u, y in zip(points, vectors, moved, strict=True):
        manifold.assert_check_point_on_manifold(y)
        assert_close(y, manifold.retr(x, u))


def test_broadcast_transp(spec):
    manifold = spec.manifold
    points = torch.stack([spec.point()] * 4)
    u = manifold.proju(points, torch.stack([spec.vector()] * 4))
    v = manifold.proju(points, spec.vector((4,), seed=2))
    moved = manifold.retr(points, u)
    transported = manifold.transp_follow_retr(points, u, v)
    manifold.assert_check_vector_on_tangent(moved, transported)
    for x, pu, pv, y, q in zip(points, u, v, moved, transported, strict=True):
        manifold.assert_check_vector_on_tangent(y, q)
        assert_close(q, manifold.transp_follow_retr(x, pu, pv))


def test_reversibility_is_not_claimed(spec):
    """geoopt skips its reversibility check when ``reversible`` is False (as for ``Sphere``):
    the retraction keeps no record of the step, so ``retr_transp(retr(x, u), -T u)`` is not
    ``x``."""
    assert spec.manifold.reversible is False


def test_logmap(spec):
    """A stack of points with one (unstacked) vector, as geoopt writes it."""
    manifold = spec.manifold
    points = torch.stack([spec.point()] * 4)
    u = manifold.proju(points, 0.3 * spec.vector() * manifold.norm(points[0], spec.vector()).max())
    y = manifold.expmap(points, u)
    back = manifold.expmap(points, manifold.logmap(points, y))
    np.testing.assert_allclose(back, y, atol=1e-6 * float(y.abs().max()), rtol=1e-6)


# ---------------------------------------------------------------------- every operation


OPERATIONS = {
    "inner": lambda m, x, u, v, y: m.inner(x, u, v),
    "inner(keepdim)": lambda m, x, u, v, y: m.inner(x, u, v, keepdim=True),
    "norm": lambda m, x, u, v, y: m.norm(x, u),
    "norm(keepdim)": lambda m, x, u, v, y: m.norm(x, u, keepdim=True),
    "component_inner": lambda m, x, u, v, y: m.component_inner(x, u, v),
    "projx": lambda m, x, u, v, y: m.projx(x),
    "proju": lambda m, x, u, v, y: m.proju(x, u),
    "egrad2rgrad": lambda m, x, u, v, y: m.egrad2rgrad(x, u),
    "retr": lambda m, x, u, v, y: m.retr(x, u),
    "expmap": lambda m, x, u, v, y: m.expmap(x, u),
    "logmap": lambda m, x, u, v, y: m.logmap(x, y),
    "dist": lambda m, x, u, v, y: m.dist(x, y),
    "dist(keepdim)": lambda m, x, u, v, y: m.dist(x, y, keepdim=True),
    "dist2": lambda m, x, u, v, y: m.dist2(x, y),
    "transp": lambda m, x, u, v, y: m.transp(x, y, v),
    "retr_transp": lambda m, x, u, v, y: m.retr_transp(x, u, v),
    "expmap_transp": lambda m, x, u, v, y: m.expmap_transp(x, u, v),
    "transp_follow_retr": lambda m, x, u, v, y: m.transp_follow_retr(x, u, v),
    "transp_follow_expmap": lambda m, x, u, v, y: m.transp_follow_expmap(x, u, v),
}

LAYOUTS = {
    # which arguments carry the batch: the point x, and the others (u, v and the point y)
    "stacked": (True, True),
    "point against stacked arguments": (False, True),
    "stacked points against one argument": (True, False),
}


def pick(t: torch.Tensor, batched: bool, index: tuple[int, ...]) -> torch.Tensor:
    return t[index] if batched else t


@pytest.mark.parametrize("batch", [(4,), (2, 3)], ids=str)
@pytest.mark.parametrize(
    ("name", "layout"),
    [
        (name, layout)
        for name in OPERATIONS
        for layout, (x_batched, _) in LAYOUTS.items()
        if x_batched or name != "projx"  # projx has no other argument to stack
    ],
)
def test_batched_operation_equals_the_loop_over_points(spec, name, layout, batch):
    """Distinct points and vectors along new leading axes give the per-point answers."""
    x_batched, others_batched = LAYOUTS[layout]
    x_batch, others_batch = (batch if x_batched else ()), (batch if others_batched else ())
    x, y = spec.point(x_batch, seed=0), spec.point(others_batch, seed=5)
    u, v = 0.3 * spec.vector(others_batch, seed=1), spec.vector(others_batch, seed=2)
    manifold, operation = spec.manifold, OPERATIONS[name]
    result = operation(manifold, x, u, v, y)
    for index in itertools.product(*map(range, batch)):
        x_i = pick(x, x_batched, index)
        u_i, v_i, y_i = (pick(t, others_batched, index) for t in (u, v, y))
        expected = operation(manifold, x_i, u_i, v_i, y_i)
        if isinstance(expected, tuple):
            for part, expected_part in zip(result, expected, strict=True):
                assert_close(part[index], expected_part)
        else:
            assert_close(result[index], expected)


@pytest.mark.parametrize("spec", PSI_SPECS, ids=str)
@pytest.mark.parametrize("name", OPERATIONS)
def test_ndim_none_is_the_same_manifold_on_one_point(spec, name):
    """``ndim=None`` reads the whole tensor as the point: on an unbatched point it is the
    manifold with ``ndim`` equal to the point's rank (``dim`` counted from the end alike)."""
    x, y, u, v = spec.point(), spec.point(seed=5), 0.3 * spec.vector(), spec.vector(seed=2)
    whole = PSIManifold(None if spec.dim is None else spec.dim % spec.ndim - spec.ndim, ndim=None)
    expected, result = (OPERATIONS[name](m, x, u, v, y) for m in (spec.manifold, whole))
    for part, expected_part in zip(
        result if isinstance(result, tuple) else (result,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    ):
        assert torch.equal(part, expected_part)


@pytest.mark.parametrize("spec", PSI_SPECS, ids=str)
def test_ndim_none_refuses_a_vector_with_a_batch(spec):
    """With ``ndim=None`` nothing says which axes of a larger vector are a batch."""
    with pytest.raises(ValueError, match=r"`u` of shape .* does not broadcast to the point"):
        PSIManifold(spec.dim, ndim=None).proju(spec.point(), spec.vector((4,)))


def test_check_point_of_a_stack_names_the_bad_point(spec):
    psi = PSIManifold(spec.dim, ndim=spec.ndim)
    points = spec.point((2, 3))
    assert spec.manifold.check_point_on_manifold(points)
    points[1, 2] = 0
    ok, reason = spec.manifold.check_point_on_manifold(points, explain=True)
    assert not ok
    assert ("(1, 2" if spec.dim is None else "(1, 2, 0)") in reason and "are zero" in reason
    with pytest.raises(ValueError, match="batch axis 0, batch axis 1"):
        psi.assert_check_point(points)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=str)
def test_random_and_origin_with_batch_shapes(spec, batch):
    manifold = PSIManifold(spec.dim, ndim=spec.ndim)
    size = (*batch, *spec.shape)
    for point in (manifold.random(*size, dtype=DTYPE), manifold.origin(*size, dtype=DTYPE)):
        assert point.shape == size and point.manifold is manifold
        manifold.assert_check_point_on_manifold(point)
        for one in point.reshape(-1, *spec.shape):
            groups = group_matrix(one, spec.dim)
            torch.testing.assert_close(groups.norm(dim=1), torch.ones(len(groups), dtype=DTYPE))
    origin = manifold.origin(*size, dtype=DTYPE)
    assert torch.equal(origin, manifold.origin(*spec.shape, dtype=DTYPE).expand(size))
    assert spec.manifold.random(*size, dtype=DTYPE).shape == size


# ---------------------------------------------------------------------- geoopt's Sphere


def unit_rows(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x / x.norm(dim=-1, keepdim=True)


SPHERE_OPERATIONS = {
    "inner": lambda m, x, u, v, y: m.inner(x, u, v),
    "inner(keepdim)": lambda m, x, u, v, y: m.inner(x, u, v, keepdim=True),
    "norm": lambda m, x, u, v, y: m.norm(x, u),
    "component_inner": lambda m, x, u, v, y: m.component_inner(x, u, v),
    "proju": lambda m, x, u, v, y: m.proju(x, u),
    "egrad2rgrad": lambda m, x, u, v, y: m.egrad2rgrad(x, u),
    "retr": lambda m, x, u, v, y: m.retr(x, u),
    "expmap": lambda m, x, u, v, y: m.expmap(x, m.proju(x, u)),
    "logmap": lambda m, x, u, v, y: m.logmap(x, y),
    "dist": lambda m, x, u, v, y: m.dist(x, y),
    "dist(keepdim)": lambda m, x, u, v, y: m.dist(x, y, keepdim=True),
    "transp": lambda m, x, u, v, y: m.transp(x, y, m.proju(x, v)),
    "retr_transp": lambda m, x, u, v, y: m.retr_transp(x, m.proju(x, u), m.proju(x, v)),
    "transp_follow_retr": lambda m, x, u, v, y: m.transp_follow_retr(
        x, m.proju(x, u), m.proju(x, v)
    ),
}


@pytest.mark.parametrize(
    ("point_shape", "vector_shape"),
    [((10,), (6, 10)), ((6, 10), (10,)), ((6, 10), (6, 10)), ((10,), (2, 3, 10))],
    ids=str,
)
@pytest.mark.parametrize("name", SPHERE_OPERATIONS)
def test_rows_broadcast_and_agree_with_sphere(name, point_shape, vector_shape):
    """``PSIManifold(dim=None, ndim=1)`` on unit rows is geoopt's ``Sphere``: same values, same
    shapes, the same broadcasting of a point against stacked vectors (and the reverse)."""
    x, y = unit_rows(*point_shape), unit_rows(*point_shape, seed=1)
    generator = torch.Generator().manual_seed(2)
    u = 0.3 * torch.randn(vector_shape, generator=generator, dtype=DTYPE)
    v = torch.randn(vector_shape, generator=generator, dtype=DTYPE)
    if name in ("logmap", "dist", "dist(keepdim)", "transp"):
        y = unit_rows(*vector_shape, seed=1)  # the second point carries the batch here
    operation = SPHERE_OPERATIONS[name]
    expected = operation(geoopt.Sphere(), x, u, v, y)
    result = operation(PSIManifold(None, ndim=1), x, u, v, y)
    for part, expected_part in zip(
        result if isinstance(result, tuple) else (result,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    ):
        assert part.shape == expected_part.shape
        torch.testing.assert_close(part, expected_part, rtol=1e-7, atol=1e-7)


def rayleigh_rows(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The sum over rows of the Rayleigh quotient: PSI in every row."""
    return ((points @ matrix * points).sum(-1) / (points * points).sum(-1)).sum()


def spd_matrix(n: int, seed: int = 0, largest: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with eigenvalues log-spaced from 0.1 to ``0.1 * largest``."""
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    )
    eigenvalues = 0.1 * torch.logspace(0, math.log10(largest), n, dtype=DTYPE)
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


STEPPERS = [
    (optimizer_class, options)
    for optimizer_class in (geoopt.optim.RiemannianSGD, psi_geoopt.optim.RiemannianSGD)
    for options in (dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True))
] + [
    (geoopt.optim.RiemannianAdam, dict()),
    (psi_geoopt.optim.RiemannianAdam, dict(amsgrad=True)),
]


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    STEPPERS,
    ids=[f"{c.__module__.split('.')[0]}-{c.__name__}-{o}" for c, o in STEPPERS],
)
def test_rows_take_the_steps_of_sphere(optimizer_class, options):
    """geoopt's and our RiemannianSGD and RiemannianAdam take the same steps on ``Sphere`` and
    on ``PSIManifold(dim=None, ndim=1)`` from unit rows."""
    matrix, _ = spd_matrix(10)
    trajectories = []
    for manifold in (geoopt.Sphere(), PSIManifold(None, ndim=1)):
        points = geoopt.ManifoldParameter(unit_rows(6, 10), manifold=manifold)
        optimizer = optimizer_class([points], lr=0.05, **options)
        trajectory = []
        for _ in range(40):
            optimizer.zero_grad()
            rayleigh_rows(points, matrix).backward()
            optimizer.step()
            trajectory.append(points.detach().clone())
        trajectories.append(torch.stack(trajectory))
    torch.testing.assert_close(trajectories[1], trajectories[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- ProductManifold


def product_manifold() -> geoopt.ProductManifold:
    return geoopt.ProductManifold(
        (PSIManifold(None, ndim=1), 10),  # a row on the sphere
        (PSIManifold(0, ndim=2), (3, 4)),  # a matrix, one group per row
        (geoopt.Euclidean(), ()),  # a scalar
    )


def product_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t[..., :10], t[..., 10:22].unflatten(-1, (3, 4)), t[..., 22]


BATCHES = [(), (5,), (2, 3)]


@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_product_projection_inner_and_retraction_per_part(batch):
    """Each factor of a product of shape ``(*batch, 23)`` is the PSI factor of its slice,
    computed here by hand, one row (group) at a time."""
    product = product_manifold()
    x = product.random(*batch, 23, dtype=DTYPE)
    generator = torch.Generator().manual_seed(1)
    u, v = (torch.randn(*batch, 23, generator=generator, dtype=DTYPE) for _ in range(2))
    assert x.shape == (*batch, 23)
    product.assert_check_point_on_manifold(x)
    assert torch.equal(product.projx(x), x)

    (w1, w2, _), (u1, u2, u3), (v1, v2, v3) = (product_parts(t) for t in (x, u, v))
    norm1, norm2 = w1.norm(dim=-1, keepdim=True), w2.norm(dim=-1, keepdim=True)
    inner = (
        (u1 * v1).sum(-1) / norm1[..., 0] ** 2
        + ((u2 * v2).sum(-1) / norm2[..., 0] ** 2).sum(-1)
        + u3 * v3
    )
    assert_close(product.inner(x, u, v), inner)

    projected = product.proju(x, u)
    p1, p2, p3 = product_parts(projected)
    assert_close(p1, u1 - (u1 * w1).sum(-1, keepdim=True) / norm1**2 * w1)
    assert_close(p2, u2 - (u2 * w2).sum(-1, keepdim=True) / norm2**2 * w2)
    assert_close(p3, u3)

    moved = product_parts(product.retr(x, projected))
    assert_close(moved[0], norm1 * (w1 + p1) / (w1 + p1).norm(dim=-1, keepdim=True))
    assert_close(moved[1], norm2 * (w2 + p2) / (w2 + p2).norm(dim=-1, keepdim=True))
    assert_close(moved[2], product_parts(x)[2] + p3)


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize(
    "optimizer_class", [geoopt.optim.RiemannianSGD, psi_geoopt.optim.RiemannianSGD]
)
def test_product_sgd_keeps_row_norms_and_reaches_the_rayleigh_minimum(optimizer_class, batch):
    r"""Minimise :math:`\sum` (Rayleigh quotient of each PSI row) :math:`+ (e - 1)^2` over a
    batch of product points: every row keeps its norm and the value reaches
    :math:`\sum \lambda_{\min}`."""
    product = product_manifold()
    matrix10, eigenvalues10 = spd_matrix(10, seed=0)
    matrix4, eigenvalues4 = spd_matrix(4, seed=1)
    start = product.random(*batch, 23, dtype=DTYPE)
    scales = torch.logspace(-1, 1, 23, dtype=DTYPE)  # rows of very different norms
    start = torch.cat(
        [start[..., :10] * 10, start[..., 10:22] * scales[10:22], start[..., 22:]], -1
    )
    x = geoopt.ManifoldParameter(start.clone(), manifold=product)
    optimizer = optimizer_class([x], lr=0.1, momentum=0.5)

    def loss() -> torch.Tensor:
        rows, matrix_rows, scalar = product_parts(x)
        return (
            rayleigh_rows(rows, matrix10)
            + rayleigh_rows(matrix_rows, matrix4)
            + ((scalar - 1) ** 2).sum()
        )

    for _ in range(600):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    points = math.prod(batch)
    optimum = points * (eigenvalues10[0] + 3 * eigenvalues4[0])
    torch.testing.assert_close(loss().detach(), optimum, rtol=1e-8, atol=0)
    for start_part, part in zip(
        product_parts(start)[:2], product_parts(x.detach())[:2], strict=True
    ):
        torch.testing.assert_close(part.norm(dim=-1), start_part.norm(dim=-1), rtol=1e-12, atol=0)


def test_product_refuses_a_whole_tensor_point():
    """``ndim=None`` would read ``(*batch, *shape)`` as one point: refused, with the fix."""
    with pytest.raises(ValueError, match=r"use PSIManifold\(dim=None, ndim=1\)"):
        geoopt.ProductManifold((PSIManifold(dim=None), 10), (geoopt.Euclidean(), ()))
    with pytest.raises(ValueError, match=r"use PSIManifold\(dim=0, ndim=2\)"):
        geoopt.ProductManifold((geoopt.Scaled(PSIManifold(dim=0), 2.0), (3, 4)))


def test_product_component_inner_and_dist():
    product = product_manifold()
    x, y = product.random(5, 23, dtype=DTYPE), product.random(5, 23, dtype=DTYPE)
    u = torch.randn(5, 23, dtype=DTYPE)
    component = product.component_inner(x, u)
    assert component.shape == x.shape
    w1, w2, _ = product_parts(x)
    c1, c2, c3 = product_parts(component)
    assert_close(
        c1,
        (
            (product_parts(u)[0] ** 2).sum(-1, keepdim=True) / (w1**2).sum(-1, keepdim=True)
        ).expand_as(c1),
    )
    assert_close(c3, product_parts(u)[2] ** 2)
    angles = [
        PSIManifold(None, ndim=1).dist(product_parts(x)[0], product_parts(y)[0]) ** 2,
        (PSIManifold(0, ndim=2).dist(product_parts(x)[1], product_parts(y)[1]) ** 2).sum(-1),
        (product_parts(x)[2] - product_parts(y)[2]) ** 2,
    ]
    assert_close(product.dist(x, y), sum(angles).sqrt())
    assert c2.shape == w2.shape


# ------------------------------------------------------------ Scaled, line search, samplers


def test_scaled_rows_are_scaled_sphere():
    x, y = unit_rows(6, 10), unit_rows(6, 10, seed=1)
    u = geoopt.Sphere().proju(x, 0.3 * torch.randn(6, 10, dtype=DTYPE))
    scaled_psi = geoopt.Scaled(PSIManifold(None, ndim=1), 2.0)
    scaled_sphere = geoopt.Scaled(geoopt.Sphere(), 2.0)
    for name, operation in {
        "dist": lambda m: m.dist(x, y),
        "retr": lambda m: m.retr(x, u),
        "expmap": lambda m: m.expmap(x, u),
        "logmap": lambda m: m.logmap(x, y),
        "inner": lambda m: m.inner(x, u),
    }.items():
        torch.testing.assert_close(
            operation(scaled_psi), operation(scaled_sphere), rtol=1e-7, atol=1e-7, msg=name
        )
    assert scaled_psi.ndim == 1 and "ndim=1" in repr(scaled_psi)


def line_search(
    manifold: geoopt.Manifold, method: str, matrix: torch.Tensor, steps: int, minimum: float
) -> torch.Tensor:
    """Steps of geoopt's steepest-descent line search on the Rayleigh quotients of 4 rows, at
    most ``steps``, stopping once the loss is within ``1e-10`` (relative) of ``minimum``: at the
    minimum itself the Armijo search of geoopt (SciPy's ``scalar_search_armijo``) can divide by
    zero, as it does for ``Sphere`` on torch 2.4."""
    points = geoopt.ManifoldParameter(unit_rows(4, 10), manifold=manifold)
    optimizer = geoopt.optim.RiemannianLineSearch([points], line_search_method=method)

    def closure() -> float:
        optimizer.zero_grad()
        loss = rayleigh_rows(points, matrix)
        loss.backward()
        return loss.item()

    trajectory = []
    for _ in range(steps):
        optimizer.step(closure)
        trajectory.append(points.detach().clone())
        if abs(rayleigh_rows(points, matrix).item() - minimum) <= 1e-10 * minimum:
            break
    return torch.stack(trajectory)


@pytest.mark.parametrize("method", ["armijo", "wolfe"])
def test_line_search_on_rows_follows_sphere(method):
    """``RiemannianLineSearch`` sums ``inner`` over the groups: on unit rows PSI and
    ``Sphere`` take the same steps (compared over 20 steps: the accepted step sizes amplify
    rounding differences later), and both reach the Rayleigh minimum of every row."""
    matrix, eigenvalues = spd_matrix(10, largest=10.0)
    minimum = 4 * eigenvalues[0].item()
    sphere, rows = (
        line_search(m, method, matrix, steps=200, minimum=minimum)
        for m in (geoopt.Sphere(), PSIManifold(None, ndim=1))
    )
    assert len(rows) >= 20 and len(sphere) >= 20
    torch.testing.assert_close(rows[:20], sphere[:20], rtol=1e-10, atol=1e-10)
    for trajectory in (sphere, rows):
        torch.testing.assert_close(
            rayleigh_rows(trajectory[-1], matrix).item(), minimum, rtol=1e-10, atol=0
        )
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(len(rows), 4, dtype=DTYPE))


@pytest.mark.parametrize(
    "sampler", [geoopt.samplers.RHMC, geoopt.samplers.RSGLD, geoopt.samplers.SGRHMC]
)
@pytest.mark.parametrize("manifold", [PSIManifold(None, ndim=1), geoopt.Sphere()], ids=repr)
def test_samplers_refuse_the_retraction_as_for_sphere(sampler, manifold):
    points = geoopt.ManifoldParameter(unit_rows(3, 10), manifold=manifold)
    with pytest.raises(ValueError, match="reversible"):
        sampler([points])
