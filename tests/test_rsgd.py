"""The fast path of :class:`psi_geoopt.optim.RiemannianSGD` against its reference loop.

``foreach=False`` runs the reference per-parameter loop (the manifold's operations); the
default runs the fused path. Both must follow the same trajectory over many steps, for every
mix of parameter kinds and hyper-parameters, and share one state format. Every test runs
twice: with the fast path's PSI step on CPU compiled by Numba
(:mod:`psi_geoopt.optim.kernels.numba`) and as NumPy operations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    CONFIGS,
    TOLERANCE,
    assert_same_trajectory,
    make_params,
    relative_error,
    run,
    set_gradients,
)

from psi_geoopt.optim import RiemannianSGD

pytestmark = pytest.mark.usefixtures("cpu_step")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_fast_path_follows_reference(dtype, config):
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run(fast_params, **config)
    reference = run(reference_params, foreach=False, **config)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    # the trajectory moved, so the comparison is not trivially satisfied
    assert relative_error(fast_params[0], make_params(dtype)[0]) > 0.1
    # the parameter without gradient is untouched and has no state
    assert torch.equal(fast_params[-1], make_params(dtype)[-1])
    assert fast_params[-1] not in fast.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_fast_path_half_precision_close_to_reference(nesterov, dtype):
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run(fast_params, steps=10, momentum=0.9, nesterov=nesterov)
    reference = run(reference_params, steps=10, momentum=0.9, nesterov=nesterov, foreach=False)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


def test_fast_path_does_not_modify_gradients():
    params = make_params(torch.float64)
    optimizer = RiemannianSGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for step in range(2):
        set_gradients(params, step)
        grads = [p.grad.clone() for p in params[:-1]]
        optimizer.step()
        for p, grad in zip(params, grads, strict=False):
            assert torch.equal(p.grad, grad)


def test_first_step_buffer_is_the_riemannian_gradient():
    point, _ = params = make_params(torch.float64)[:2]
    set_gradients(params, 0)
    params.pop()
    expected = point.manifold.egrad2rgrad(point.detach(), point.grad)
    start = point.detach().clone()
    optimizer = RiemannianSGD(params, lr=0.05, momentum=0.9)
    optimizer.step()
    buffer = optimizer.state[point]["momentum_buffer"]
    transported = point.manifold.transp(start, point.detach(), expected)
    assert relative_error(buffer, transported) <= 1e-12
    assert relative_error(point, point.manifold.retr(start, -0.05 * expected)) <= 1e-12


def test_state_dict_roundtrip_and_shared_format():
    """Stop after a few steps, reload into a new optimizer (either path), continue: the same
    result as an uninterrupted run; the two paths' state dicts have identical structure (the
    group option ``foreach`` apart)."""
    config = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    uninterrupted_params = make_params(torch.float64)
    uninterrupted = run(uninterrupted_params, steps=10, **config)

    params = make_params(torch.float64)
    first_half = run(params, steps=5, **config)
    saved = copy.deepcopy(first_half.state_dict())
    reference_state = run(make_params(torch.float64), steps=5, foreach=False, **config).state_dict()
    assert [group.pop("foreach") for group in saved["param_groups"]] == [None]
    assert [group.pop("foreach") for group in reference_state["param_groups"]] == [False]
    assert saved["param_groups"] == reference_state["param_groups"]
    assert saved["state"].keys() == reference_state["state"].keys()
    for key, entry in saved["state"].items():
        assert entry.keys() == reference_state["state"][key].keys() == {"momentum_buffer"}

    for foreach in (None, False):
        resumed_params = make_params(torch.float64)
        with torch.no_grad():
            for target, source in zip(resumed_params, params, strict=True):
                target.copy_(source)
        resumed = RiemannianSGD(resumed_params, lr=0.05, foreach=foreach, **config)
        resumed.load_state_dict(copy.deepcopy(saved))  # a checkpoint without `foreach`
        assert resumed.param_groups[0]["foreach"] is foreach
        for step in range(5, 10):
            set_gradients(resumed_params, step)
            resumed.step()
        for a, b in zip(resumed_params, uninterrupted_params, strict=True):
            assert relative_error(a, b) <= 1e-12
        if foreach is None:
            assert all(
                torch.equal(a, b) for a, b in zip(resumed_params, uninterrupted_params, strict=True)
            )
    assert uninterrupted.state_dict()["param_groups"][0]["step"] == 10


def test_stabilize_runs_on_both_paths_alike():
    fast_params, reference_params = make_params(torch.float64), make_params(torch.float64)
    fast = run(fast_params, momentum=0.9, stabilize=3)
    reference = run(reference_params, momentum=0.9, stabilize=3, foreach=False)
    assert_same_trajectory(fast, reference, fast_params, reference_params, 1e-12)


def test_fused_step_keeps_norm_and_horizontal_buffer():
    """The closed forms assume the norm is kept and the buffer horizontal: check both hold."""
    params = make_params(torch.float64)[:3]  # the last one gets no gradient
    norms = [p.detach().flatten(1).norm(dim=1) for p in params[:2]]
    optimizer = run(params, momentum=0.9, nesterov=True)
    for p, norm in zip(params[:2], norms, strict=True):
        rows, buffer = p.detach().flatten(1), optimizer.state[p]["momentum_buffer"].flatten(1)
        torch.testing.assert_close(rows.norm(dim=1), norm, rtol=1e-12, atol=0)
        cosine = (rows * buffer).sum(1) / (rows.norm(dim=1) * buffer.norm(dim=1))
        assert cosine.abs().max() <= 1e-12
