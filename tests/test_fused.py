"""The fused PSI step shared by both optimizers: what it marks as written, and its per-group
algebra in PyTorch (as off the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TOLERANCE,
    assert_same_adam_state,
    assert_same_trajectory,
    make_params,
    run,
    run_adam,
)

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
