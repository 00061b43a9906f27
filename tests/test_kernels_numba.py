"""The Numba loop of the PSI step (:mod:`psi_geoopt.optim.kernels.numba`) on CPU."""

from __future__ import annotations

import hashlib
import inspect

import geoopt
import pytest
import torch
from conftest import TOLERANCE, make_params, relative_error, run, run_adam

from psi_geoopt import PSIManifold
from psi_geoopt.optim import RiemannianSGD


@pytest.mark.parametrize("cpu_step", ["numba"], indirect=True)
def test_numba_kernel_runs_on_cpu(cpu_step, monkeypatch):
    """With Numba installed, every PSI tensor of both optimizers takes the compiled loop
    (serial or threaded by size), and ``compile=False`` keeps both eager."""
    from psi_geoopt.optim.kernels import numba as numba_step

    shapes = []
    for name in ("_SERIAL", "_PARALLEL"):
        kernel = getattr(numba_step, name)
        monkeypatch.setattr(
            numba_step, name, lambda x, *a, _kernel=kernel: shapes.append(x.shape) or _kernel(x, *a)
        )
    fused = [(8, 27), (16, 5), (1, 24), (1, 7)]  # grouped along axis 0, or as a whole
    run(make_params(torch.float32), steps=2, momentum=0.9)
    assert sorted(shapes) == sorted(fused * 2)
    shapes.clear()
    run_adam(make_params(torch.float32), steps=2)
    assert sorted(shapes) == sorted(fused * 2)
    shapes.clear()
    run(make_params(torch.float32), steps=2, momentum=0.9, compile=False)
    run_adam(make_params(torch.float32), steps=2, compile=False)
    assert shapes == []


@pytest.mark.parametrize("cpu_step", ["numba"], indirect=True)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_numba_kernel_sums_in_float64(cpu_step, scale):
    """The compiled loop forms the per-group sums in float64: float32 groups whose squares
    overflow or underflow float32 (entries around 1e±20) take the steps of float64 ones."""
    trajectories = []
    for dtype in (torch.float32, torch.float64):
        params = make_params(dtype)[:2]
        with torch.no_grad():
            for p in params:
                p.mul_(scale)
        run(params, momentum=0.9)
        trajectories.append(params)
    for single, double in zip(*trajectories, strict=True):
        assert torch.isfinite(single).all()
        assert relative_error(single, double) <= TOLERANCE[torch.float32]


def test_numba_cache_follows_the_closed_forms():
    """Numba keys its on-disk cache of a function to the function's file and closure, and the
    loop inlines the closed forms from another file: the loop's closure holds a digest of
    their source, so that an edit of them recompiles the loop instead of running the cached
    one."""
    from psi_geoopt.optim import _closed_form
    from psi_geoopt.optim.kernels import numba as kernels

    digest = hashlib.sha256(inspect.getsource(_closed_form).encode()).hexdigest()
    for loop in (kernels._SERIAL, kernels._PARALLEL):
        assert digest in [cell.cell_contents for cell in loop.py_func.__closure__]


@pytest.mark.parametrize("cpu_step", ["numba"], indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_numba_loop_keeps_torch_thread_count(cpu_step, threads):
    """A tensor large enough for the threaded loop: the loop runs on PyTorch's thread count
    and leaves it as it was (Numba's OpenMP layer shares the runtime with PyTorch), so that
    ``torch.set_num_threads`` and the reproducibility it gives hold across steps."""
    from psi_geoopt.optim.kernels import numba as numba_step

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        point = geoopt.ManifoldParameter(
            torch.randn(256, numba_step.PARALLEL_NUMEL // 256), manifold=PSIManifold(0)
        )
        point.grad = torch.randn_like(point)
        optimizer = RiemannianSGD([point], lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.step()
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
