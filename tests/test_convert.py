"""Tests of psi_geoopt.convert: finding scale-invariant weights and converting them."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch
import torch.nn.functional as F
from convert_models import MODELS, ResNet18, mixed, preact_resnet, resnet18
from torch import nn

import psi_geoopt
from psi_geoopt import (
    PSIManifold,
    explain_scale_invariance,
    find_scale_invariant,
    param_groups,
    to_psi,
)
from psi_geoopt.convert.numeric import NumericProbe
from psi_geoopt.convert.probe import Probe
from psi_geoopt.optim import RiemannianSGD


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The probes run many tiny kernels: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]()


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


# ------------------------------------------------------------------ hand-labelled truth


@pytest.mark.parametrize("name", list(MODELS))
def test_finds_exactly_the_hand_labelled_weights(name):
    model, inputs, truth = _build(name)
    found = find_scale_invariant(model, inputs)
    assert found == truth


def test_weights_are_tested_one_by_one_where_the_joint_rescaling_fails(monkeypatch):
    rescaled_change = NumericProbe.rescaled_change
    calls = []

    def joint_fails(self, groupings):
        calls.append(len(groupings))
        return float("inf") if len(groupings) > 1 else rescaled_change(self, groupings)

    monkeypatch.setattr(NumericProbe, "rescaled_change", joint_fails)
    model, inputs, truth = _build("mixed")
    assert find_scale_invariant(model, inputs) == truth
    assert calls[0] > 1 and set(calls[1:]) == {1}


def test_float32_and_eval_mode_models_are_probed_in_training_mode():
    model, inputs, truth = _build("vgg_bn")
    model.eval()
    assert find_scale_invariant(model, inputs) == truth


def test_probe_leaves_model_and_random_state_as_they_were():
    model, inputs, _ = _build("mixed")
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


def test_verbose_explains_decisions(capsys):
    model, inputs, _ = preact_resnet()
    find_scale_invariant(model, inputs, verbose=True)
    out = capsys.readouterr().out
    assert "layer1.conv1.weight: PSI, dim=0" in out
    assert "layer1.conv2.weight: not PSI" in out
    assert "fc.weight: not PSI (dim=0: its scale reaches the model's output" in out


def test_explanations_come_back_as_data():
    model, inputs, truth = preact_resnet()
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


# --------------------------------------------------------- structural and numeric both needed


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.dead = nn.Conv2d(3, 4, 1, bias=False)
        self.zero = nn.Conv2d(3, 4, 1, bias=False)
        self.bn_zero = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.zero.weight.zero_()

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.bn(self.conv(x)) + self.bn_zero(self.zero(x))
        return self.head(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_the_numeric_probe():
    model = _Untraceable()
    with pytest.warns(UserWarning, match="cannot trace"):
        found = find_scale_invariant(model, torch.randn(5, 3, 4, 4))
    # `dead` is unused, `zero` is zero (no point of the manifold), head is not PSI
    assert found == {"conv.weight": 0}


def test_structural_no_wins_over_a_fooled_numeric_probe():
    """A residual add of a tiny shortcut passes a loose numeric test but not the structure."""

    class TinyShortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x) + 1e-30 * x)

    model = TinyShortcut()
    assert find_scale_invariant(model, torch.randn(4, 3, 5, 5)) == {}


def test_model_that_only_runs_in_its_own_precision():
    class Float32Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            scale = torch.linspace(1, 2, 6)  # float32 whatever the model's dtype
            return self.bn(self.linear(x)) @ torch.diag(scale)

    found = find_scale_invariant(Float32Inside(), torch.randn(8, 4))
    assert found == {"linear.weight": 0}


def test_normalization_eps_does_not_hide_invariance():
    """Weights so small that the eps of BN dominates the variance are still found.

    With ``eps`` kept, rescaling such a weight changes the output by O(1); the probe sets the eps
    of normalization modules and of traced functional calls to 1e-30.
    """

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.functional = nn.Conv2d(3, 4, 3, bias=False)
            with torch.no_grad():
                self.conv.weight.mul_(1e-5)
                self.functional.weight.mul_(1e-5)

        def forward(self, x):
            y = F.batch_norm(self.functional(x), None, None, training=True, eps=1e-3)
            return self.bn(self.conv(x)), y

    model, inputs = Tiny(), torch.randn(6, 3, 6, 6)
    probe = Probe(model, inputs)
    probe.copy.module.bn.eps = 1e-5  # what the probe would see without its eps
    assert probe.numeric.rescaled_change({"conv.weight": 0}) > 1e-2  # eps alone would say "no"
    assert find_scale_invariant(model, inputs) == {"conv.weight": 0, "functional.weight": 0}


def test_weight_with_no_effect_is_not_reported():
    model, inputs, truth = mixed()
    found = find_scale_invariant(model, inputs)
    assert "no_effect.weight" not in found
    assert "no_effect.weight" not in truth


def test_zero_groups_are_rejected():
    """A zero row rules out per-row groups (dim=None remains), a zero weight any grouping."""
    model, inputs, _ = _build("mlp_bn")
    with torch.no_grad():
        model[4].weight[3].zero_()
    assert find_scale_invariant(model, inputs) == {"1.weight": 0, "4.weight": None}
    with torch.no_grad():
        model[4].weight.zero_()  # and now 1.weight has no effect on the output either
    assert find_scale_invariant(model, inputs) == {}


# ------------------------------------------------------------------------------- to_psi


def test_to_psi_keeps_names_values_and_outputs():
    model, inputs, truth = resnet18()
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


def test_state_dicts_load_both_ways_and_conversion_is_idempotent():
    model, inputs, truth = resnet18()
    to_psi(model, inputs)
    converted = dict(model.named_parameters())
    assert to_psi(model, inputs).keys() == truth.keys()
    assert all(p is converted[n] for n, p in model.named_parameters())  # nothing replaced

    plain = ResNet18()
    plain.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    fresh = ResNet18()
    model.load_state_dict(fresh.state_dict())
    assert all(p is converted[n] for n, p in model.named_parameters())  # loaded in place
    for key, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert all(isinstance(converted[n], geoopt.ManifoldParameter) for n in truth)


def test_to_deepcopy_and_shared_parameters_survive():
    model, inputs, truth = mixed()
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


def test_torch_compile_runs_a_converted_model():
    model, inputs, _ = _build("vgg_bn")
    to_psi(model, inputs)
    model.eval()  # dropout off: the same function with and without compilation
    expected = model(inputs)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs), expected)
    compiled.train()
    compiled(inputs).sum().backward()
    assert model[0].weight.grad is not None


def test_forced_names():
    model, inputs, _ = mixed()
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


def test_forced_non_invariant_weight_raises_and_converts_nothing():
    model, inputs, _ = preact_resnet()
    with pytest.raises(ValueError, match=r"'layer1\.conv2\.weight'") as error:
        to_psi(model, inputs, names=["layer1.conv1.weight", "layer1.conv2.weight", "fc.weight"])
    assert "'fc.weight'" in str(error.value)
    assert "layer1.conv1.weight" not in str(error.value)
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in model.parameters())
    manifolds = to_psi(model, inputs, names=["layer1.conv2.weight"], check=False)
    assert manifolds["layer1.conv2.weight"].dim is None
    assert isinstance(model.layer1.conv2.weight, geoopt.ManifoldParameter)


# -------------------------------------------------------------------------- param_groups


def test_param_groups_cover_every_parameter_once():
    model, inputs, truth = resnet18()
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
def test_converted_resnet_trains(make_optimizer):
    torch.manual_seed(0)
    model, _, truth = resnet18()
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


def test_bad_example_inputs():
    model, inputs, _ = _build("mlp_bn")
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


def test_unknown_name():
    model, inputs, _ = _build("mlp_bn")
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
