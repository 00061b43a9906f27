"""The fast path of :class:`psi_geoopt.optim.RiemannianSGD` against its reference loop.

``foreach=False`` runs the reference per-parameter loop (the manifold's operations); the
default runs the fused path. Both must follow the same trajectory over many steps, for every
mix of parameter kinds and hyper-parameters, and share one state format. Every test runs
twice: with the fast path's PSI step on CPU compiled by Numba (:mod:`psi_geoopt.numba_step`)
and as NumPy operations.
"""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch
from torch import nn

from psi_geoopt import PSIManifold
from psi_geoopt.optim import RiemannianAdam, RiemannianSGD, _fused, radam, rsgd
from psi_geoopt.optim.kernels import compiled

STEPS = 25
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=1e-2),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(momentum=0.5, dampening=0.3, weight_decay=1e-3),
]


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def cpu_step(request, monkeypatch):
    """Which implementation runs the fast path's PSI step on CPU: the compiled loop of
    :mod:`psi_geoopt.numba_step`, or NumPy operations (as without Numba installed)."""
    if request.param == "numba":
        if _fused._kernel_module("kernels.numba") is None:
            pytest.skip("Numba is not installed")
    else:
        monkeypatch.setitem(_fused._KERNELS, "kernels.numba", None)
    return request.param


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """One parameter of each kind: PSI along axis 0 (fused), along other axes, on the whole
    tensor, non-contiguous (reference loop), plain, on the sphere, and one without gradient.
    Groups have norms spread over two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    def psi(tensor, dim):
        scaled = tensor * 10 ** (2 * torch.rand(tensor.shape[0], generator=generator) - 1).to(
            torch.float64
        ).reshape(-1, *[1] * (tensor.dim() - 1))
        return geoopt.ManifoldParameter(scaled.to(dtype), manifold=PSIManifold(dim))

    sphere = randn(4, 3)
    return [
        psi(randn(8, 3, 3, 3), 0),
        psi(randn(16, 5), 0),
        psi(randn(6, 4), None),
        psi(randn(7), None),
        psi(randn(5, 6), 1),
        psi(randn(5, 6), -1),
        psi(randn(6, 5).t(), 0),  # non-contiguous
        nn.Parameter(randn(5).to(dtype)),
        nn.Parameter(randn(3, 4).to(dtype)),
        geoopt.ManifoldParameter(
            (sphere / sphere.norm(dim=-1, keepdim=True)).to(dtype), manifold=geoopt.Sphere()
        ),
        psi(randn(4, 3), 0),  # never gets a gradient
    ]


def set_gradients(params: list[torch.Tensor], step: int) -> None:
    """Gradients scaled like those of a scale-invariant loss (1 / group norm), fixed by step."""
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params[:-1]:
        grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        p.grad = (grad.to(p.device) / p.detach().double().norm()).to(p.dtype)


def run(params, steps: int = STEPS, optimizer_class=RiemannianSGD, **options):
    optimizer = optimizer_class(params, lr=0.05, **options)
    for step in range(steps):
        set_gradients(params, step)
        optimizer.step()
    return optimizer


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_same_trajectory(fast, reference, fast_params, reference_params, rtol):
    for index, (a, b) in enumerate(zip(fast_params, reference_params, strict=True)):
        assert a.dtype == b.dtype
        assert relative_error(a, b) <= rtol, (index, relative_error(a, b))
        state_a, state_b = fast.state.get(a, {}), reference.state.get(b, {})
        assert state_a.keys() == state_b.keys(), index
        if "momentum_buffer" in state_a:
            buffer_a, buffer_b = state_a["momentum_buffer"], state_b["momentum_buffer"]
            assert buffer_a.shape == buffer_b.shape and buffer_a.dtype == buffer_b.dtype
            assert relative_error(buffer_a, buffer_b) <= rtol, (index, "buffer")


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


@pytest.mark.parametrize("cpu_step", ["numba"], indirect=True)
def test_numba_kernel_runs_on_cpu(cpu_step, monkeypatch):
    """With Numba installed, every PSI tensor of both optimizers takes the compiled loop
    (serial or threaded by size), and ``compile=False`` keeps RiemannianSGD eager."""
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
    result as an uninterrupted run; the two paths' state dicts have identical structure."""
    config = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    uninterrupted_params = make_params(torch.float64)
    uninterrupted = run(uninterrupted_params, steps=10, **config)

    params = make_params(torch.float64)
    first_half = run(params, steps=5, **config)
    saved = copy.deepcopy(first_half.state_dict())
    reference_state = run(make_params(torch.float64), steps=5, foreach=False, **config).state_dict()
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
        resumed.load_state_dict(copy.deepcopy(saved))
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
def test_compiled_path_follows_reference_without_recompiling(dtype):
    """``compile=True``: one graph for the group's PSI tensors, the same trajectory as the
    reference loop, and a learning rate that changes every step causes no recompilation."""
    from torch._dynamo.utils import counters

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
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


ADAM_CONFIGS = [
    dict(),
    dict(amsgrad=True),
    dict(weight_decay=1e-2, stabilize=3),
    dict(betas=(0.5, 0.9), eps=1e-3),
]


def run_adam(params, steps: int = STEPS, **options) -> RiemannianAdam:
    return run(params, steps, RiemannianAdam, **options)


def assert_same_adam_state(fast, reference, fast_params, reference_params, rtol):
    for index, (a, b) in enumerate(zip(fast_params, reference_params, strict=True)):
        assert relative_error(a, b) <= rtol, (index, relative_error(a, b))
        state_a, state_b = fast.state.get(a, {}), reference.state.get(b, {})
        assert state_a.keys() == state_b.keys(), index
        for key in state_b:
            if key == "step":
                assert state_a[key] == state_b[key] and isinstance(state_a[key], int)
            else:
                assert relative_error(state_a[key], state_b[key]) <= rtol, (index, key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_adam_fast_path_follows_geoopt_loop(dtype, config):
    """``foreach=False`` runs geoopt's loop for every parameter; the default takes the fast
    path for the PSI parameters grouped along axis 0 and geoopt's loop for the others."""
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, **config)
    reference = run_adam(reference_params, foreach=False, **config)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    assert relative_error(fast_params[0], make_params(dtype)[0]) > 0.1
    assert not fast.state.get(fast_params[-1])  # geoopt's stabilize leaves an empty entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_fast_path_half_precision_close_to_geoopt_loop(dtype):
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, steps=10, amsgrad=True)
    run_adam(reference_params, steps=10, amsgrad=True, foreach=False)
    for a, b in zip(fast_params, reference_params, strict=True):
        assert a.dtype == dtype
        assert relative_error(a, b) <= TOLERANCE[dtype]
    assert fast.state[fast_params[0]]["exp_avg_sq"].dtype == dtype


def test_adam_fast_path_keeps_one_second_moment_per_group_and_the_gradient():
    params = make_params(torch.float64)
    optimizer = RiemannianAdam(params, lr=0.05, weight_decay=1e-2)
    for step in range(3):
        set_gradients(params, step)
        grads = [params[0].grad.clone(), params[7].grad.clone()]  # PSI, Euclidean
        optimizer.step()
        assert torch.equal(params[0].grad, grads[0]) and torch.equal(params[7].grad, grads[1])
    second = optimizer.state[params[0]]["exp_avg_sq"].flatten(1)
    assert torch.equal(second, second[:, :1].expand_as(second))


def test_adam_step_hooks_run_once():
    """The fast path runs geoopt's loop for the other parameters inside its own step: the
    optimizer's step hooks must still run once per step, also after an instance of geoopt's
    class has wrapped that class's ``step`` with torch's hook runner."""
    geoopt.optim.RiemannianAdam([nn.Parameter(torch.ones(2))], lr=0.1)
    params = make_params(torch.float64)
    optimizer = RiemannianAdam(params, lr=0.05)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    set_gradients(params, 0)
    optimizer.step()
    assert calls == ["pre", "post"]


def test_adam_resumes_across_paths():
    """A checkpoint of the fast path continues under geoopt's loop, and back."""
    config = dict(amsgrad=True, weight_decay=1e-3)
    uninterrupted_params = make_params(torch.float64)
    run_adam(uninterrupted_params, steps=10, **config)
    for first, second in ((None, False), (False, None)):
        params = make_params(torch.float64)
        saved = copy.deepcopy(run_adam(params, steps=5, foreach=first, **config).state_dict())
        resumed_params = make_params(torch.float64)
        with torch.no_grad():
            for target, source in zip(resumed_params, params, strict=True):
                target.copy_(source)
        resumed = RiemannianAdam(resumed_params, lr=0.05, foreach=second, **config)
        resumed.load_state_dict(saved)
        for step in range(5, 10):
            set_gradients(resumed_params, step)
            resumed.step()
        for a, b in zip(resumed_params, uninterrupted_params, strict=True):
            assert relative_error(a, b) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scalar_algebra_in_torch_matches_reference(monkeypatch, dtype):
    """Off the CPU the per-group algebra runs in PyTorch instead of NumPy: that branch, run
    here on CPU tensors, follows the reference loop too (SGD with Nesterov, Adam with
    amsgrad)."""
    for module in (rsgd, radam):
        monkeypatch.setattr(module, "_algebra_module", lambda tensor: torch)
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    config = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    fast = run(fast_params, **config)
    reference = run(reference_params, foreach=False, **config)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, amsgrad=True)
    reference = run_adam(reference_params, amsgrad=True, foreach=False)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


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


def test_bad_switches_are_rejected():
    params = make_params(torch.float64)[:1]
    with pytest.raises(TypeError, match="foreach"):
        RiemannianSGD(params, lr=0.1, foreach="yes")
    with pytest.raises(TypeError, match="compile"):
        RiemannianSGD(params, lr=0.1, compile=1)


def test_sparse_gradient_is_rejected_on_both_paths():
    for foreach in (None, False):
        weight = nn.Parameter(torch.randn(4, 3))
        weight.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            RiemannianSGD([weight], lr=0.1, foreach=foreach).step()
