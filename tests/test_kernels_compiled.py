"""The PSI step through :func:`torch.compile` (:mod:`psi_geoopt.optim.kernels.compiled`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (
    TOLERANCE,
    assert_same_trajectory,
    make_params,
    needs_tested_torch,
    run,
    set_gradients,
)

from psi_geoopt.optim import RiemannianSGD
from psi_geoopt.optim.kernels import compiled

pytestmark = pytest.mark.usefixtures("cpu_step")


@needs_tested_torch("torch.compile of the PSI step (inductor of torch 2.6 fails on its graph)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_path_follows_reference_without_recompiling(dtype):
    """``compile=True``: one graph for the group's PSI tensors, built at the second step (the
    test fails if compilation falls back to eager operations), the same trajectory as the
    reference loop, and a learning rate that changes every step causes no recompilation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a graph built by an earlier test would be reused
    counters.clear()
    warnings.filterwarnings("error", "RiemannianSGD.compile=True.: torch.compile failed")
    config = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = RiemannianSGD(fast_params, lr=0.05, compile=True, **config)
    reference = RiemannianSGD(reference_params, lr=0.05, foreach=False, **config)
    schedules = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.8) for o in (fast, reference)]
    for step in range(8):
        for params, optimizer, schedule in zip(
            (fast_params, reference_params), (fast, reference), schedules, strict=True
        ):
            set_gradients(params, step)
            optimizer.step()
            schedule.step()
        if step == 2:  # the first step is eager, the second compiles
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(function, **kwargs):
        def compiled(*args, **kwargs):
            raise RuntimeError("no compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled, "_COMPILED", {})
    fast_params, reference_params = make_params(torch.float64), make_params(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run(fast_params, momentum=0.9, compile=True)
    assert any("torch.compile failed" in str(w.message) for w in caught)
    reference = run(reference_params, momentum=0.9, foreach=False)
    assert_same_trajectory(fast, reference, fast_params, reference_params, 1e-12)
