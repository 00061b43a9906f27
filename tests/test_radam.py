""":class:`psi_geoopt.optim.RiemannianAdam` against geoopt's own
:class:`geoopt.optim.RiemannianAdam`: its reference loop bit for bit, its fast path (the PSI
step on CPU compiled by Numba and as NumPy operations) to rounding."""

from __future__ import annotations

import copy
import inspect

import geoopt
import pytest
import torch
from conftest import (
    ADAM_CONFIGS,
    TOLERANCE,
    assert_same_adam_state,
    make_params,
    relative_error,
    run,
    run_adam,
    set_gradients,
)
from torch import nn

from psi_geoopt.optim import RiemannianAdam

pytestmark = pytest.mark.usefixtures("cpu_step")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_adam_fast_path_follows_geoopt_loop(dtype, config):
    """The default takes the fast path for the PSI parameters grouped along axis 0 and the
    Euclidean ones, the reference loop for the others: geoopt's iterates and state."""
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, **config)
    reference = run(reference_params, optimizer_class=geoopt.optim.RiemannianAdam, **config)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    assert relative_error(fast_params[0], make_params(dtype)[0]) > 0.1
    assert not fast.state.get(fast_params[-1])  # geoopt's stabilize leaves an empty entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_fast_path_half_precision_close_to_geoopt_loop(dtype):
    fast_params, reference_params = make_params(dtype), make_params(dtype)
    fast = run_adam(fast_params, steps=10, amsgrad=True)
    run(reference_params, 10, geoopt.optim.RiemannianAdam, amsgrad=True)
    for a, b in zip(fast_params, reference_params, strict=True):
        assert a.dtype == dtype
        assert relative_error(a, b) <= TOLERANCE[dtype]
    assert fast.state[fast_params[0]]["exp_avg_sq"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_adam_reference_loop_is_geoopts(dtype, config):
    """``foreach=False`` runs the reference loop for every parameter: geoopt's algorithm in
    geoopt's order of operations, so the same iterates and state, bit for bit."""
    params, geoopt_params = make_params(dtype), make_params(dtype)
    reference = run_adam(params, foreach=False, **config)
    geoopts = run(geoopt_params, optimizer_class=geoopt.optim.RiemannianAdam, **config)
    assert_same_adam_state(reference, geoopts, params, geoopt_params, 0.0)
    assert relative_error(params[0], make_params(dtype)[0]) > 0.1


def test_adam_owns_its_loop(monkeypatch):
    """The step never calls geoopt's: neither a subclass nor a replaced
    ``geoopt.optim.RiemannianAdam.step`` changes it (or recurses into it)."""
    expected = {foreach: make_params(torch.float64) for foreach in (None, False)}
    for foreach, params in expected.items():
        run_adam(params, steps=3, foreach=foreach)

    def replaced(self, closure=None):
        raise AssertionError("geoopt's step was called")

    class Subclass(RiemannianAdam):
        def step(self, closure=None):
            return super().step(closure)

    monkeypatch.setattr(geoopt.optim.RiemannianAdam, "step", replaced)
    for optimizer_class in (RiemannianAdam, Subclass):
        for foreach, reference in expected.items():
            params = make_params(torch.float64)
            run(params, 3, optimizer_class, foreach=foreach)
            assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


@pytest.mark.parametrize(
    "option", ["maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"]
)
def test_adam_refuses_the_options_geoopt_ignores(option):
    """``torch.optim.Adam``'s options that geoopt's constructor takes and its step ignores are
    refused, in the constructor and in a parameter group, rather than silently ignored."""
    params = make_params(torch.float64)[:2]
    # torch < 2.7 has no ``decoupled_weight_decay``: its own constructor refuses the keyword
    known = option in inspect.signature(torch.optim.Adam).parameters
    with pytest.raises(ValueError if known else TypeError, match=option):
        RiemannianAdam(params[:1], lr=0.1, **{option: True})
    optimizer = RiemannianAdam(params[:1], lr=0.1)
    with pytest.raises(ValueError, match=option):
        optimizer.add_param_group({"params": params[1:], option: True})


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
    """The optimizer's step hooks run once per step, also after an instance of geoopt's class
    has wrapped that class's ``step`` with torch's hook runner."""
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
    """A checkpoint of the fast path continues under the reference loop, and back."""
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
        resumed = RiemannianAdam(resumed_params, lr=0.05, **config)
        resumed.load_state_dict(saved)
        assert resumed.param_groups[0]["foreach"] is first  # a group option, saved
        resumed.param_groups[0]["foreach"] = second
        for step in range(5, 10):
            set_gradients(resumed_params, step)
            resumed.step()
        for a, b in zip(resumed_params, uninterrupted_params, strict=True):
            assert relative_error(a, b) <= 1e-12
