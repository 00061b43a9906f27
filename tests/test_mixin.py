"""What both optimizers share (:mod:`psi_geoopt.optim._mixin`): ``foreach`` and ``compile`` as
options of each parameter group, as in :mod:`torch.optim` (defaults of the constructor, set
per group, saved and restored with the state, older checkpoints and pickles filled in), and
the parameters a step takes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import make_params, run, set_gradients
from torch import nn

from psi_geoopt.optim import RiemannianAdam, RiemannianSGD, radam, rsgd

OPTIMIZERS = {"sgd": (RiemannianSGD, dict(momentum=0.9)), "adam": (RiemannianAdam, dict())}


@pytest.fixture(params=list(OPTIMIZERS))
def optimizer_class(request):
    return OPTIMIZERS[request.param]


def test_options_are_group_defaults(optimizer_class):
    cls, hyper = optimizer_class
    params = make_params(torch.float64)
    optimizer = cls(
        [{"params": params[:2]}, {"params": params[2:4], "foreach": False, "compile": True}],
        foreach=True,
        compile=False,
        lr=0.05,
        **hyper,
    )
    optimizer.add_param_group({"params": params[4:6]})
    options = [(group["foreach"], group["compile"]) for group in optimizer.param_groups]
    assert options == [(True, False), (False, True), (True, False)]
    assert optimizer.defaults["foreach"] is True and optimizer.defaults["compile"] is False
    saved = optimizer.state_dict()["param_groups"]
    assert [(group["foreach"], group["compile"]) for group in saved] == options


@pytest.mark.parametrize("module", [rsgd, radam], ids=["sgd", "adam"])
def test_each_group_takes_the_path_of_its_option(module, monkeypatch):
    """``foreach=False`` on one group sends that group alone through the reference loop."""
    cls = RiemannianSGD if module is rsgd else RiemannianAdam
    paths = []
    for name in ("single", "multi"):
        function = getattr(module, f"_{name}_tensor_{module.__name__.rsplit('.', 1)[1]}")

        def counted(params, *args, _name=name, _function=function, **kwargs):
            paths.append((_name, len(params)))
            return _function(params, *args, **kwargs)

        monkeypatch.setattr(module, function.__name__, counted)
    params = make_params(torch.float64)[:6]
    optimizer = cls([{"params": params[:2]}, {"params": params[2:], "foreach": False}], lr=0.1)
    set_gradients(params, 0)  # all but the last
    optimizer.step()
    assert paths == [("multi", 2), ("single", 3)]


def test_bad_options_are_rejected(optimizer_class):
    cls, hyper = optimizer_class
    params = make_params(torch.float64)[:2]
    with pytest.raises(TypeError, match="`foreach` must be a bool or None, got 'yes'"):
        cls(params[:1], lr=0.05, foreach="yes", **hyper)
    with pytest.raises(TypeError, match="`compile` must be a bool or None, got 1"):
        cls(params[:1], lr=0.05, compile=1, **hyper)
    optimizer = cls(params[:1], lr=0.05, **hyper)
    with pytest.raises(TypeError, match="`foreach`"):
        optimizer.add_param_group({"params": params[1:], "foreach": 0})


def test_options_come_back_with_a_checkpoint(optimizer_class):
    """``load_state_dict`` restores every group option, these included (as torch's do); a
    checkpoint saved without them (an older version) gives the optimizer's own defaults."""
    cls, hyper = optimizer_class
    saved = run(make_params(torch.float64), 2, cls, foreach=False, compile=False, **hyper)
    state = copy.deepcopy(saved.state_dict())
    resumed = cls(make_params(torch.float64), lr=0.05, compile=True, **hyper)
    resumed.load_state_dict(copy.deepcopy(state))
    assert (resumed.param_groups[0]["foreach"], resumed.param_groups[0]["compile"]) == (
        False,
        False,
    )
    for group in state["param_groups"]:
        del group["foreach"], group["compile"]
    resumed = cls(make_params(torch.float64), lr=0.05, compile=True, **hyper)
    resumed.load_state_dict(state)
    assert (resumed.param_groups[0]["foreach"], resumed.param_groups[0]["compile"]) == (
        None,
        True,
    )


def test_pickles_keep_the_options_and_older_ones_load(optimizer_class):
    cls, hyper = optimizer_class
    optimizer = run(make_params(torch.float64), 2, cls, foreach=False, **hyper)
    copied = pickle.loads(pickle.dumps(optimizer))
    assert copied.param_groups[0]["foreach"] is False and copied.defaults["foreach"] is False
    older = optimizer.__getstate__()  # as pickled before the options were group options
    older = {
        "defaults": {k: v for k, v in older["defaults"].items() if k not in ("foreach", "compile")},
        "state": older["state"],
        "param_groups": [
            {k: v for k, v in group.items() if k not in ("foreach", "compile")}
            for group in older["param_groups"]
        ],
    }
    restored = cls.__new__(cls)
    restored.__setstate__(older)
    assert restored.param_groups[0]["foreach"] is None and restored.defaults["compile"] is None
    set_gradients(restored.param_groups[0]["params"], 2)
    restored.step()


def test_sparse_gradient_is_rejected_on_both_paths(optimizer_class):
    cls, hyper = optimizer_class
    for foreach in (None, False):
        weight = nn.Parameter(torch.randn(4, 3))
        weight.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse"):
            cls([weight], lr=0.1, foreach=foreach, **hyper).step()
