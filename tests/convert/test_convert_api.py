"""Tests of the public functions of psi_geoopt.convert: report, to_psi, param_groups."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch
from conftest import needs_tested_torch
from torch import nn

import psi_geoopt
from psi_geoopt import (
    PSIManifold,
    explain_scale_invariance,
    find_scale_invariant,
    param_groups,
    to_psi,
)
from psi_geoopt.optim import RiemannianSGD


def _as_tuple(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _described(p: torch.Tensor):
    return p.dtype, p.device, p.requires_grad, p.data_ptr(), p.shape


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [type(p) for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_same_snapshot(before, after):
    states, flags, types, grad_flags = before
    assert flags == after[1]
    assert types == after[2]
    assert grad_flags == after[3]
    assert states.keys() == after[0].keys()
    for key, value in states.items():
        # torch.equal ignores dtypes: compare them separately
        assert value.dtype == after[0][key].dtype, key
        assert torch.equal(value, after[0][key]), key


def test_probe_leaves_model_and_random_state_as_they_were(build):
    model, inputs, _ = build("mixed")
    model.bn_a.eval()  # a mixture of flags must survive
    model.head.eval()
    model.sync.weight.requires_grad_(False)
    model(*inputs)  # running statistics and num_batches_tracked that are not the initial ones
    before = _snapshot(model)
    assert before[0]["bn_c.num_batches_tracked"] == 1
    rng = torch.get_rng_state()
    find_scale_invariant(model, inputs)
    to_psi(model, inputs, names=["conv_bias_bn.weight"])  # probe again, convert one
    assert torch.equal(rng, torch.get_rng_state())
    after = _snapshot(model)
    _assert_same_snapshot((before[0], before[1], after[2], before[3]), after)
    assert before[2] != after[2]  # exactly one parameter changed class
    assert isinstance(model.conv_bias_bn.weight, geoopt.ManifoldParameter)


def test_verbose_explains_decisions(capsys, build):
    model, inputs, _ = build("preact_resnet")
    find_scale_invariant(model, inputs, verbose=True)
    out = capsys.readouterr().out
    assert "layer1.conv1.weight: PSI, dim=0" in out
    assert "layer1.conv2.weight: not PSI" in out
    assert "fc.weight: not PSI (dim=0: its scale reaches the model's output" in out


def test_explanations_come_back_as_data(build):
    model, inputs, truth = build("preact_resnet")
    report = explain_scale_invariance(model, inputs)
    assert report.found == truth
    decision = report.decisions["layer1.conv1.weight"]
    assert decision.invariant and decision.dim == 0
    assert decision.reason == "scale removed by layer1.bn2 (BatchNorm2d)"
    assert not report.decisions["fc.weight"].invariant
    assert "its scale reaches the model's output" in report.decisions["fc.weight"].reason
    assert set(report.decisions) == {n for n, p in model.named_parameters() if p.dim() > 1}
    assert report.other_parameters == sum(1 for p in model.parameters() if p.dim() == 1)
    assert report.notes == ()
    assert str(report).splitlines()[0] == "find_scale_invariant(PreActResNet):"


# ------------------------------------------------------------------------------- to_psi


def test_to_psi_keeps_names_values_and_outputs(build):
    model, inputs, truth = build("resnet18")
    model.layer1[0].conv1.weight.requires_grad_(False)
    plain = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: _described(p) for n, p in model.named_parameters()}
    manifolds = to_psi(model, inputs)
    assert manifolds.keys() == truth.keys()
    assert all(m.dim == truth[n] for n, m in manifolds.items())
    params = dict(model.named_parameters())
    assert {n: _described(p) for n, p in params.items()} == params_before
    for name in truth:
        assert isinstance(params[name], geoopt.ManifoldParameter)
        assert params[name].manifold is manifolds[name]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for train in (True, False):
        model.train(train)
        plain.train(train)
        torch.testing.assert_close(model(inputs), plain(inputs), rtol=0, atol=0)


def test_state_dicts_load_both_ways_and_conversion_is_idempotent(build):
    model, inputs, truth = build("resnet18")
    to_psi(model, inputs)
    converted = dict(model.named_parameters())
    assert to_psi(model, inputs).keys() == truth.keys()
    assert all(p is converted[n] for n, p in model.named_parameters())  # nothing replaced

    plain = type(model)()
    plain.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    fresh = type(model)()
    model.load_state_dict(fresh.state_dict())
    assert all(p is converted[n] for n, p in model.named_parameters())  # loaded in place
    for key, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert all(isinstance(converted[n], geoopt.ManifoldParameter) for n in truth)


def test_to_deepcopy_and_shared_parameters_survive(build):
    model, inputs, truth = build("mixed")
    to_psi(model, inputs)
    model.eval()  # deterministic (no dropout, running statistics)
    twin = copy.deepcopy(model)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert type(q) is type(p) and q.data_ptr() != p.data_ptr(), name
        if name in truth:
            assert q.manifold.dim == truth[name] and q.manifold is not p.manifold
    torch.testing.assert_close(twin(*inputs), model(*inputs), rtol=0, atol=0)
    double = twin.to(torch.float64)
    for name, p in double.named_parameters():
        assert p.dtype == torch.float64
        if name in truth:
            assert isinstance(p, geoopt.ManifoldParameter)
            assert p.manifold.dim == truth[name]
    head, _ = double(*(t.double() for t in inputs))
    assert head.dtype == torch.float64


def test_shared_parameter_stays_shared():
    conv = nn.Conv2d(3, 3, 1, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1, bias=False))
    model[3].weight = conv.weight  # the same Parameter registered twice, used in series
    to_psi(model, torch.randn(4, 3, 2, 2), names={"0.weight": None}, check=False)
    assert model[0].weight is model[3].weight
    assert isinstance(model[3].weight, geoopt.ManifoldParameter)


@needs_tested_torch("torch.compile of a model with ManifoldParameters (dynamo of torch 2.4 fails)")
def test_torch_compile_runs_a_converted_model(build):
    model, inputs, _ = build("vgg_bn")
    to_psi(model, inputs)
    model.eval()  # dropout off: the same function with and without compilation
    expected = model(inputs)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs), expected)
    compiled.train()
    compiled(inputs).sum().backward()
    assert model[0].weight.grad is not None


def test_forced_names(build):
    model, inputs, _ = build("mixed")
    manifolds = to_psi(model, inputs, names=["conv_relu_bn.weight", "linear_layernorm.weight"])
    assert {n: m.dim for n, m in manifolds.items()} == {
        "conv_relu_bn.weight": 0,
        "linear_layernorm.weight": None,
    }
    assert not isinstance(model.conv_bias_bn.weight, geoopt.ManifoldParameter)
    # a coarser grouping than found holds too; a finer one does not
    assert (
        to_psi(model, inputs, names={"conv_bias_bn.weight": None})["conv_bias_bn.weight"].dim
        is None
    )
    with pytest.raises(ValueError, match=r"'linear_bias_layernorm.weight'.*dim=0"):
        to_psi(model, inputs, names={"linear_bias_layernorm.weight": 0})


def test_forced_non_invariant_weight_raises_and_converts_nothing(build):
    model, inputs, _ = build("preact_resnet")
    with pytest.raises(ValueError, match=r"'layer1\.conv2\.weight'") as error:
        to_psi(model, inputs, names=["layer1.conv1.weight", "layer1.conv2.weight", "fc.weight"])
    assert "'fc.weight'" in str(error.value)
    assert "layer1.conv1.weight" not in str(error.value)
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in model.parameters())
    manifolds = to_psi(model, inputs, names=["layer1.conv2.weight"], check=False)
    assert manifolds["layer1.conv2.weight"].dim is None
    assert isinstance(model.layer1.conv2.weight, geoopt.ManifoldParameter)


# -------------------------------------------------------------------------- param_groups


def test_param_groups_cover_every_parameter_once(build):
    model, inputs, truth = build("resnet18")
    to_psi(model, inputs)
    model.fc.bias.requires_grad_(False)  # frozen: still covered (it may be unfrozen later)
    model.layer1[0].conv1.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=5e-4, lr=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    euclidean, psi = groups
    assert euclidean == {"params": euclidean["params"], "weight_decay": 5e-4}
    assert psi["weight_decay"] == 0.0 and psi["lr"] == 0.5
    assert {id(p) for p in psi["params"]} == {
        id(p) for n, p in model.named_parameters() if n in truth
    }
    plain = nn.Linear(2, 2)
    assert param_groups(plain) == [{"params": list(plain.parameters()), "weight_decay": 0.0}]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda groups: RiemannianSGD(groups, lr=0.05, momentum=0.9),
        lambda groups: geoopt.optim.RiemannianSGD(groups, lr=0.05, momentum=0.9),
        lambda groups: geoopt.optim.RiemannianAdam(groups, lr=0.01),
    ],
    ids=["psi-sgd", "geoopt-sgd", "geoopt-adam"],
)
def test_converted_resnet_trains(make_optimizer, build):
    torch.manual_seed(0)
    model, _, truth = build("resnet18")
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 3, 16, 16, generator=generator)
    targets = torch.randint(0, 10, (16,), generator=generator)
    to_psi(model, inputs)
    psi = {n: p for n, p in model.named_parameters() if n in truth}
    norms = {n: p.detach().flatten(1).norm(dim=1) for n, p in psi.items()}
    optimizer = make_optimizer(param_groups(model, weight_decay=5e-4))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    for name, p in psi.items():
        torch.testing.assert_close(
            p.detach().flatten(1).norm(dim=1), norms[name], rtol=1e-5, atol=0
        )


# ----------------------------------------------------------------------------- bad input


def test_non_module_is_rejected():
    for call in (
        lambda: find_scale_invariant(lambda x: x, torch.randn(2)),
        lambda: to_psi("model", torch.randn(2)),
        lambda: param_groups([torch.randn(2)]),
    ):
        with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
            call()


def test_bad_example_inputs(build):
    model, inputs, _ = build("mlp_bn")
    with pytest.raises(TypeError, match="example_inputs"):
        find_scale_invariant(model, [inputs])
    with pytest.raises(RuntimeError, match="forward pass of Sequential on `example_inputs` failed"):
        find_scale_invariant(model, torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="forward pass of Sequential") as error:
        to_psi(model, torch.randn(4, 5))
    assert isinstance(error.value.__cause__, RuntimeError)  # the original error is chained
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in model.parameters())


def test_failing_forward_reports_the_models_own_error():
    """Not the float64 copy's dtype clash: the error the model gives on the inputs as they are."""

    class Float32InsideAndBroken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 4, bias=False)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return (self.bn(self.linear(x)) @ torch.eye(4)).view(-1, 7)

    with pytest.raises(RuntimeError, match=r"failed \(RuntimeError: shape '\[-1, 7\]' is invalid"):
        find_scale_invariant(Float32InsideAndBroken(), torch.randn(5, 3))


def test_unknown_name(build):
    model, inputs, _ = build("mlp_bn")
    with pytest.raises(ValueError, match=r"no parameter '1\.wieght'; did you mean '1\.weight'"):
        to_psi(model, inputs, names=["1.wieght"])
    with pytest.raises(TypeError, match="`names` must be a list"):
        to_psi(model, inputs, names="1.weight")
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        to_psi(model, inputs, names={"1.weight": 2})


def test_model_without_normalization(capsys):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_scale_invariant(model, torch.randn(5, 3), verbose=True) == {}
    assert "no normalization layer" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="no scale-invariant parameter found"):
        assert to_psi(model, torch.randn(5, 3)) == {}


def test_param_groups_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-1.0)
    with pytest.raises(ValueError, match="params"):
        param_groups(model, params=[])


def test_exported():
    exported = {"find_scale_invariant", "explain_scale_invariance", "to_psi", "param_groups"}
    assert exported <= set(psi_geoopt.__all__)
    assert PSIManifold is psi_geoopt.PSIManifold
