"""The sparse optimizers of :mod:`psi_geoopt.optim.sparse` on PSI rows, and their refusals.

geoopt's sparse optimizers step ``point[rows]`` for the rows that have a gradient: right when
every PSI group lies in one row, wrong otherwise. Ours take the first kind, step for step like
the dense optimizers, and refuse the second with a ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import geoopt
import pytest
import torch
from torch import nn

import psi_geoopt.optim
from psi_geoopt import PSIManifold
from psi_geoopt.optim import SparseRiemannianAdam, SparseRiemannianSGD

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
SPARSE = [SparseRiemannianSGD, SparseRiemannianAdam]
OPTIONS = {SparseRiemannianSGD: dict(lr=0.1, momentum=0.5), SparseRiemannianAdam: dict(lr=0.05)}


def rows_parameter(manifold: geoopt.Manifold, seed: int = 0) -> geoopt.ManifoldParameter:
    """An (8, 6) table whose rows have norms from 0.1 to 10."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(8, 6, generator=generator, dtype=DTYPE)
    return geoopt.ManifoldParameter(
        table * torch.logspace(-1, 1, 8, dtype=DTYPE)[:, None], manifold=manifold
    )


def spd_matrix(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1)).double())
    eigenvalues = torch.linspace(1, 3, n, dtype=DTYPE)
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


def rayleigh_of_looked_up_rows(table: torch.Tensor, indices: torch.Tensor, matrix) -> torch.Tensor:
    """The Rayleigh quotients of the rows looked up by ``indices``: a sparse gradient."""
    rows = nn.functional.embedding(indices, table, sparse=True)
    return ((rows @ matrix * rows).sum(-1) / (rows * rows).sum(-1)).sum()


ACCEPTED = {
    "rows as points": PSIManifold(dim=None, ndim=1),
    "one group per row": PSIManifold(dim=0),
    "one group per row of a point": PSIManifold(dim=-2, ndim=2),
    "scaled rows": geoopt.Scaled(PSIManifold(dim=None, ndim=1), 2.0),
}


@pytest.mark.parametrize("optimizer_class", SPARSE)
@pytest.mark.parametrize("manifold", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_rows_keep_their_norms_and_reach_the_minimum(optimizer_class, manifold):
    """Random batches of looked-up rows: untouched rows stay, every row keeps its norm and
    reaches the Rayleigh minimum (Adam, at a constant learning rate, to within 3e-4)."""
    matrix, eigenvalues = spd_matrix(6)
    table = rows_parameter(manifold)
    norms = table.detach().norm(dim=1)
    optimizer = optimizer_class([table], **OPTIONS[optimizer_class])
    generator = torch.Generator().manual_seed(2)
    for _ in range(400):
        indices = torch.randperm(8, generator=generator)[:3]
        before = table.detach().clone()
        optimizer.zero_grad()
        rayleigh_of_looked_up_rows(table, indices, matrix).backward()
        optimizer.step()
        untouched = torch.ones(8, dtype=torch.bool)
        untouched[indices] = False
        assert torch.equal(table.detach()[untouched], before[untouched])
    torch.testing.assert_close(table.detach().norm(dim=1), norms, rtol=1e-12, atol=0)
    value = rayleigh_of_looked_up_rows(table, torch.arange(8), matrix).detach()
    rtol = 1e-8 if optimizer_class is SparseRiemannianSGD else 3e-4
    torch.testing.assert_close(value, 8 * eigenvalues[0], rtol=rtol, atol=0)


@pytest.mark.parametrize(
    ("sparse_class", "dense_class", "options"),
    [
        (SparseRiemannianSGD, psi_geoopt.optim.RiemannianSGD, dict(lr=0.1)),
        (SparseRiemannianAdam, geoopt.optim.RiemannianAdam, dict(lr=0.05)),
    ],
)
def test_sparse_step_is_the_dense_step(sparse_class, dense_class, options):
    """When every row gets a gradient, the sparse step is the dense optimizer's step."""
    matrix, _ = spd_matrix(6)
    manifold = PSIManifold(dim=None, ndim=1)
    sparse, dense = rows_parameter(manifold), rows_parameter(manifold)
    sparse_optimizer, dense_optimizer = (
        sparse_class([sparse], **options),
        dense_class([dense], **options),
    )
    indices = torch.arange(8)
    for _ in range(20):
        for table, optimizer in ((sparse, sparse_optimizer), (dense, dense_optimizer)):
            optimizer.zero_grad()
            rayleigh_of_looked_up_rows(table, indices, matrix).backward()
            if table is dense:
                table.grad = table.grad.to_dense()
            optimizer.step()
    torch.testing.assert_close(sparse.detach(), dense.detach(), rtol=1e-12, atol=1e-12)


REFUSED = {
    "whole-tensor group": PSIManifold(dim=None),
    "one group per column": PSIManifold(dim=1),
    "one group per column, counted from the end": PSIManifold(dim=-1),
    "whole point of rank 2": PSIManifold(dim=None, ndim=2),
    "columns of a point of rank 2": PSIManifold(dim=1, ndim=2),
    "scaled whole tensor": geoopt.Scaled(PSIManifold(dim=None), 2.0),
}


@pytest.mark.parametrize("optimizer_class", SPARSE)
@pytest.mark.parametrize("manifold", REFUSED.values(), ids=REFUSED.keys())
def test_groups_across_rows_are_refused_naming_the_parameter(optimizer_class, manifold):
    plain = nn.Parameter(torch.zeros(4, 3))
    message = (
        rf"{optimizer_class.__name__}: parameter 1 of parameter group 0 \(shape \(8, 6\), on "
        r"PSI\(.*\) has PSI groups that span several rows.*PSIManifold\(dim=None, ndim=1\)"
    )
    with pytest.raises(ValueError, match=message):
        optimizer_class([plain, rows_parameter(manifold)], lr=0.1)
    optimizer = optimizer_class([plain], lr=0.1)
    with pytest.raises(ValueError, match="parameter 0 of parameter group 1"):
        optimizer.add_param_group({"params": rows_parameter(manifold)})
    assert len(optimizer.param_groups) == 1


def test_geoopt_sparse_step_of_a_whole_tensor_group_is_not_the_riemannian_step():
    """Why the refusal: geoopt's own sparse SGD projects and retracts the looked-up rows as if
    they were the whole group, and its step differs from the dense Riemannian step."""
    matrix, _ = spd_matrix(6)
    manifold = PSIManifold(dim=None)
    sparse, dense = rows_parameter(manifold), rows_parameter(manifold)
    indices = torch.tensor([1, 4])
    steps = []
    for table, optimizer_class in (
        (sparse, geoopt.optim.SparseRiemannianSGD),
        (dense, geoopt.optim.RiemannianSGD),
    ):
        optimizer = optimizer_class([table], lr=0.1)
        rayleigh_of_looked_up_rows(table, indices, matrix).backward()
        table.grad = table.grad.to_dense() if table is dense else table.grad
        start = table.detach().clone()
        optimizer.step()
        steps.append(table.detach() - start)
    error = (steps[0] - steps[1]).norm() / steps[1].norm()
    assert error > 1e-3


def test_stabilize_checks_the_points():
    table = rows_parameter(PSIManifold(dim=None, ndim=1))
    optimizer = SparseRiemannianSGD([table], lr=0.1, stabilize=1)
    indices = torch.tensor([2])
    rayleigh_of_looked_up_rows(table, indices, torch.eye(6, dtype=DTYPE)).backward()
    table.grad = torch.sparse_coo_tensor(
        indices[None], torch.full((1, 6), float("nan"), dtype=DTYPE), (8, 6), check_invariants=True
    )
    with pytest.raises(ValueError, match=r"groups \[2\] along batch axis 0 are non-finite"):
        optimizer.step()


def test_exported_from_optim():
    assert psi_geoopt.optim.SparseRiemannianSGD is SparseRiemannianSGD
    assert psi_geoopt.optim.SparseRiemannianAdam is SparseRiemannianAdam
    assert issubclass(SparseRiemannianSGD, geoopt.optim.SparseRiemannianSGD)
    assert issubclass(SparseRiemannianAdam, geoopt.optim.SparseRiemannianAdam)
