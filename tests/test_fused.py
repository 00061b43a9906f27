"""The fused PSI step shared by both optimizers: what it marks as written, and its per-group
algebra in PyTorch (as off the CPU)."""

from __future__ import annotations

import geoopt
import pytest
import torch
from conftest import (
    TOLERANCE,
    assert_same_adam_state,
    assert_same_trajectory,
    make_params,
    relative_error,
    run,
    run_adam,
)

from psi_geoopt import PSIManifold
from psi_geoopt.optim import RiemannianAdam, RiemannianSGD, _fused

pytestmark = pytest.mark.usefixtures("cpu_step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: RiemannianSGD(params, lr=0.1, momentum=0.9),
        lambda params: RiemannianSGD(params, lr=0.1, momentum=0.9, foreach=False),
        lambda params: RiemannianAdam(params, lr=0.1),
        lambda params: RiemannianAdam(params, lr=0.1, foreach=False),
    ],
    ids=["sgd", "sgd-reference", "adam", "adam-reference"],
)
def test_step_marks_what_it_writes_as_modified(make_optimizer, dtype):
    """The fast path writes through NumPy views on CPU: a backward through a graph that saved
    a weight before the step must still fail, as after PyTorch's own in-place updates,
    instead of silently differentiating at the new values."""
    weights = [p for p in make_params(dtype)[:2]]
    optimizer = make_optimizer(weights)
    for _ in range(2):  # the first step and a later one (they take different branches)
        loss = sum(
            (w.square() * torch.arange(w.numel()).to(dtype).view_as(w)).sum() for w in weights
        )
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        versions = [w._version for w in weights]
        optimizer.step()
        assert all(w._version > v for w, v in zip(weights, versions, strict=True))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scalar_algebra_in_torch_matches_reference(monkeypatch, dtype):
    """Off the CPU the per-group algebra runs in PyTorch instead of NumPy: that branch, run
    here on CPU tensors, follows the reference loop too (SGD with Nesterov, Adam with
    amsgrad)."""
    monkeypatch.setattr(_fused, "_algebra_module", lambda device: torch)
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    config = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    fast = run(fast_params, **config)
    reference = run(reference_params, foreach=False, **config)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, amsgrad=True)
    reference = run_adam(reference_params, amsgrad=True, foreach=False)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


def make_batched_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """PSI parameters in geoopt's batch convention (the trailing ``ndim`` axes are a point),
    points whose norms spread over two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)

    def psi(shape, dim, ndim):
        scales = 10 ** (2 * torch.rand(shape[: len(shape) - ndim], generator=generator) - 1)
        tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
        tensor = tensor * scales.to(torch.float64).reshape(*scales.shape, *[1] * ndim)
        return geoopt.ManifoldParameter(tensor.to(dtype), manifold=PSIManifold(dim, ndim=ndim))

    return [
        psi((6, 10), None, 1),  # rows on the sphere
        psi((3, 8, 3, 3, 3), 0, 4),  # a stack of conv weights
        psi((2, 3, 5, 6), -2, 2),  # one group per row of each matrix
        psi((4, 5, 3), None, 2),  # one group per matrix
        psi((2, 3, 5, 4), 1, 2),  # groups along the point's axis 1: the reference loop
        psi((5,), None, 1),  # one point, no batch
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True), "adam"],
    ids=["momentum", "nesterov", "adam"],
)
def test_fast_path_reads_the_groups_of_batched_points(dtype, config):
    """With ``ndim`` the fused pass takes the groups as the rows of a ``(-1, group_size)``
    view; the trajectories equal the reference loop's (the manifold's batched operations)."""
    params = make_batched_params(dtype)
    sizes = [_fused._fused_group_size(p, p.manifold) for p in params]
    assert sizes == [10, 27, 6, 15, None, 5]
    reference_params = make_batched_params(dtype)
    if config == "adam":
        fast, reference = run_adam(params), run_adam(reference_params, foreach=False)
        assert_same_adam_state(fast, reference, params, reference_params, TOLERANCE[dtype])
    else:
        fast = run(params, **config)
        reference = run(reference_params, foreach=False, **config)
        assert_same_trajectory(fast, reference, params, reference_params, TOLERANCE[dtype])
    assert relative_error(params[1], make_batched_params(dtype)[1]) > 0.1
