"""Bad input to :class:`psi_geoopt.PSIManifold` gets a clear error, and nothing is corrupted."""

from __future__ import annotations

import geoopt
import pytest
import torch

import psi_geoopt
from psi_geoopt import PSIManifold

pytestmark = pytest.mark.usefixtures("single_thread")

BAD_VALUES = {"zero": 0.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
LABELS = {"zero": "zero", "nan": "non-finite", "inf": "non-finite", "-inf": "non-finite"}


def point_with_bad_groups(kind: str, dim: int | None, dtype=torch.float64) -> torch.Tensor:
    """A (4, 3, 2) point whose groups 1 and 3 (along ``dim``) are bad, or one bad entry."""
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    value = BAD_VALUES[kind]
    if dim is None:
        if kind == "zero":
            x.zero_()
        else:
            x[2, 1, 0] = value
        return x
    for group in (1, 3) if x.shape[dim] > 3 else (1,):
        whole, entry = [slice(None)] * 3, [0] * 3
        whole[dim] = entry[dim] = group
        if kind == "zero":
            x[tuple(whole)] = 0
        else:
            x[tuple(entry)] = value  # one bad entry spoils its group
    return x


def expected_message(kind: str, dim: int | None, shape) -> str:
    if dim is None:
        return f"whole-tensor group is {LABELS[kind]}"
    groups = "1, 3" if shape[dim] > 3 else "1"
    return rf"groups \[{groups}\] along dim={dim} are {LABELS[kind]}"


ENTRY_POINTS = {
    "ManifoldParameter": lambda m, x: geoopt.ManifoldParameter(x, manifold=m),
    "ManifoldTensor": lambda m, x: geoopt.ManifoldTensor(x, manifold=m),
    "assert_check_point": lambda m, x: m.assert_check_point(x),
    "assert_check_point_on_manifold": lambda m, x: m.assert_check_point_on_manifold(x),
    "assert_check_vector_on_tangent": lambda m, x: m.assert_check_vector_on_tangent(x, x * 0),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", BAD_VALUES)
@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_zero_nan_or_inf_group_is_rejected_naming_the_groups(entry, kind, dim):
    x = point_with_bad_groups(kind, dim)
    before = x.clone()
    with pytest.raises(ValueError, match=expected_message(kind, dim, x.shape)):
        ENTRY_POINTS[entry](PSIManifold(dim=dim), x)
    assert torch.equal(x.nan_to_num(), before.nan_to_num()), "the input was modified"


@pytest.mark.parametrize("kind", BAD_VALUES)
@pytest.mark.parametrize("dim", [0, 2, None])
def test_checks_return_false_with_the_reason(kind, dim):
    manifold, x = PSIManifold(dim=dim), point_with_bad_groups(kind, dim)
    for check in (manifold.check_point, manifold.check_point_on_manifold):
        ok, reason = check(x, explain=True)
        assert not ok
        assert "must be finite and non-zero" in reason
        assert check(x) is False
    ok, reason = manifold.check_vector_on_tangent(x, x * 0, explain=True)
    assert not ok and "finite and non-zero" in reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bad_groups_are_found_in_every_float_dtype(dtype):
    with pytest.raises(ValueError, match=r"groups \[1, 3\] along dim=0 are zero"):
        PSIManifold(dim=0).assert_check_point(point_with_bad_groups("zero", 0, dtype))


def test_long_lists_of_bad_groups_are_shortened():
    x = torch.ones(30, 2)
    x[::2] = 0
    with pytest.raises(ValueError, match=r"groups \[0, 2, 4, .*, 18, \.\.\. \(15 in all\)\]"):
        PSIManifold(dim=0).assert_check_point(x)


@pytest.mark.parametrize(("shape", "dim"), [((3, 0), 0), ((0, 4, 0), 1), ((0,), None)])
def test_empty_groups_are_zero_groups(shape, dim):
    with pytest.raises(ValueError, match="zero"):
        geoopt.ManifoldParameter(torch.ones(shape), manifold=PSIManifold(dim=dim))


def test_a_tensor_without_groups_is_a_point():
    """Shape (0, 3) grouped along axis 0 has no group at all: nothing to reject."""
    x = torch.ones(0, 3)
    PSIManifold(dim=0).assert_check_point(x)
    assert PSIManifold(dim=0).projx(x) is x


@pytest.mark.parametrize("kind", BAD_VALUES)
def test_projx_does_not_check_the_values(kind):
    """``projx`` runs at every step of geoopt's ``RiemannianAdam``: it must not read the values
    (that would wait for the device); the bad point is left to the checks."""
    x = point_with_bad_groups(kind, 0)
    assert PSIManifold(dim=0).projx(x) is x
    assert not PSIManifold(dim=0).check_point(x)


# ---------------------------------------------------------------------- dim and shapes


@pytest.mark.parametrize("dim", [2, -3, 7])
def test_dim_out_of_range_is_rejected_at_first_use(dim):
    manifold, x = PSIManifold(dim=dim), torch.ones(3, 4)
    message = rf"`dim`={dim} is out of range for a tensor of rank 2"
    with pytest.raises(ValueError, match=message):
        geoopt.ManifoldParameter(x, manifold=manifold)
    for operation in (
        lambda: manifold.proju(x, x),
        lambda: manifold.retr(x, x),
        lambda: manifold.inner(x, x),
        lambda: manifold.random(3, 4),
        lambda: manifold.origin(3, 4),
    ):
        with pytest.raises(ValueError, match=message):
            operation()
    ok, reason = manifold.check_point(x, explain=True)
    assert not ok and "out of range" in reason


@pytest.mark.parametrize("dim", [0, -1, None])
def test_rank_zero_tensors_are_rejected(dim):
    manifold, x = PSIManifold(dim=dim), torch.tensor(2.0)
    message = "at least one dimension, got a rank-0 tensor"
    with pytest.raises(ValueError, match=message):
        geoopt.ManifoldParameter(x, manifold=manifold)
    with pytest.raises(ValueError, match=message):
        manifold.proju(x, x)
    with pytest.raises(ValueError, match=message):
        manifold.random(())
    assert manifold.check_point_on_manifold(x) is False


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtypes_are_rejected(dtype):
    manifold, x = PSIManifold(dim=0), torch.ones(3, 4, dtype=dtype)
    message = f"unsupported dtype {dtype}"
    with pytest.raises(TypeError, match=message):
        geoopt.ManifoldParameter(x, manifold=manifold)
    with pytest.raises(TypeError, match=message):
        manifold.proju(x, torch.ones(3, 4))
    with pytest.raises(TypeError, match=message):
        manifold.retr(x, torch.ones(3, 4))
    for check in (manifold.check_point, manifold.check_point_on_manifold):
        ok, reason = check(x, explain=True)
        assert not ok and message in reason


@pytest.mark.parametrize("dim", [1.5, True, False, "0", (0,), [0]])
def test_dim_must_be_an_int_or_none(dim):
    with pytest.raises(TypeError, match="`dim` must be an int or None"):
        PSIManifold(dim=dim)


@pytest.mark.parametrize("bad_shape", [(3, 5), (2, 3, 4)])
def test_tangent_check_of_a_vector_that_does_not_broadcast(bad_shape):
    manifold, x = PSIManifold(dim=0), torch.ones(3, 4)
    ok, reason = manifold.check_vector_on_tangent(x, torch.zeros(bad_shape), explain=True)
    assert not ok and "`u`" in reason and "does not broadcast" in reason
    with pytest.raises(ValueError, match="does not broadcast"):
        manifold.assert_check_vector_on_tangent(x, torch.zeros(bad_shape))


def test_an_optimizer_that_produces_a_bad_point_is_stopped_by_stabilize():
    """A NaN gradient makes a NaN point; with ``stabilize`` the optimizer raises instead of
    training on silently."""
    manifold = PSIManifold(dim=0)
    parameter = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=manifold)
    optimizer = psi_geoopt.optim.RiemannianSGD([parameter], lr=0.1, momentum=0.9, stabilize=1)
    parameter.grad = torch.full((3, 4), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        optimizer.step()


# ---------------------------------------------------------------------- ndim (batches of points)


@pytest.mark.parametrize("ndim", [1.0, True, "1", (1,)])
def test_ndim_must_be_an_int_or_none(ndim):
    with pytest.raises(TypeError, match="`ndim` must be an int or None"):
        PSIManifold(dim=0, ndim=ndim)


@pytest.mark.parametrize("ndim", [0, -1])
def test_ndim_must_be_positive(ndim):
    with pytest.raises(ValueError, match=rf"`ndim`={ndim}, but a point has at least one"):
        PSIManifold(dim=None, ndim=ndim)


@pytest.mark.parametrize(("dim", "ndim"), [(1, 1), (-2, 1), (4, 4), (-5, 4)])
def test_dim_out_of_the_point_is_rejected_at_construction(dim, ndim):
    message = rf"`dim`={dim} is out of range for points of `ndim`={ndim} \(expected -{ndim}"
    with pytest.raises(ValueError, match=message):
        PSIManifold(dim=dim, ndim=ndim)


def test_tensor_of_lower_rank_than_a_point_is_rejected():
    manifold, x = PSIManifold(dim=0, ndim=4), torch.ones(3, 3, 3)
    message = r"a point has `ndim`=4 dimensions, got a tensor of rank 3"
    with pytest.raises(ValueError, match=message):
        geoopt.ManifoldParameter(x, manifold=manifold)
    with pytest.raises(ValueError, match=message):
        manifold.retr(x, x)
    with pytest.raises(ValueError, match=message):
        manifold.random(3, 3, 3)
    ok, reason = manifold.check_point(x, explain=True)
    assert not ok and "`x`" in reason


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        (None, r"groups \[\(0, 1\), \(2, 0\)\] along \(batch axis 0, batch axis 1\) are zero"),
        (-1, r"groups \[\(0, 1, 2\), \(2, 0, 2\)\] along \(batch axis 0, batch axis 1, dim=-1\)"),
    ],
)
def test_bad_groups_of_a_stack_of_points_are_named(dim, expected):
    x = torch.randn(3, 2, 4, 3, generator=torch.Generator().manual_seed(0))
    x[0, 1, :, 2 if dim is not None else slice(None)] = 0
    x[2, 0, :, 2 if dim is not None else slice(None)] = 0
    with pytest.raises(ValueError, match=expected):
        geoopt.ManifoldParameter(x, manifold=PSIManifold(dim=dim, ndim=2))
    ok, reason = PSIManifold(dim=dim, ndim=2).check_point(x[0, 1], explain=True)
    assert not ok
    assert (
        "the group of the point is zero" if dim is None else "groups [2] along dim=-1"
    ) in reason


def test_geoopt_stabilize_does_not_check_but_ours_does():
    """geoopt's ``stabilize`` only calls ``projx``, which no longer reads the values; our
    optimizers check the points when ``stabilize`` is due."""
    for optimizer_class, raises in (
        (geoopt.optim.RiemannianSGD, False),
        (psi_geoopt.optim.RiemannianSGD, True),
        (psi_geoopt.optim.RiemannianAdam, True),
    ):
        parameter = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=PSIManifold(dim=0))
        optimizer = optimizer_class([parameter], lr=0.1, stabilize=1)
        parameter.grad = torch.full((3, 4), float("nan"))
        if raises:
            with pytest.raises(ValueError, match=r"groups \[0, 1, 2\] along dim=0 are non-finite"):
                optimizer.step()
        else:
            optimizer.step()
            assert not PSIManifold(dim=0).check_point(parameter)
