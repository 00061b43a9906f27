"""Tests of the decisions of psi_geoopt.convert: which weights are found, and why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psi_geoopt import explain_scale_invariance, find_scale_invariant
from psi_geoopt.convert.numeric import NumericProbe
from psi_geoopt.convert.probe import Probe

# ------------------------------------------------------------------ hand-labelled truth


def test_finds_exactly_the_hand_labelled_weights(labelled):
    model, inputs, truth = labelled
    assert find_scale_invariant(model, inputs) == truth


def test_the_answer_does_not_depend_on_where_in_training_the_model_is(labelled):
    """Biases, normalization scales and shifts and layer scales at random values of random
    magnitudes 1e-6 to 10, as training may leave them, change nothing."""
    model, inputs, truth = labelled
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                magnitude = 10.0 ** (7 * torch.rand(p.shape, generator=generator) - 6)
                p.copy_(magnitude * torch.randn(p.shape, generator=generator).sign())
    assert find_scale_invariant(model, inputs) == truth


def test_a_bias_is_removed_only_by_a_mean_over_axes_it_is_constant_along(build):
    """ConvNeXt's stem (Conv with a zero bias → LayerNorm over channels) and a Conv with a zero
    bias into a GroupNorm of two channels per group are not PSI, whatever their bias is now:
    after one step it is not zero, and rescaling the weight by 10 changes the output."""
    model, inputs, _ = build("init_special")
    report = explain_scale_invariance(model, inputs)
    for name in ("stem.weight", "grouped.weight"):
        assert not report.decisions[name].invariant
        assert "a shift varies inside the normalized slices" in report.decisions[name].reason
    with torch.no_grad():
        model.stem.bias.normal_()
    output = model(inputs)
    with torch.no_grad():
        model.stem.weight.mul_(10)
    assert not torch.allclose(model(inputs), output, rtol=1e-2)


def test_a_frozen_bias_keeps_its_value(build):
    """A bias that does not train stays zero: then the LayerNorm over channels removes it."""
    model, inputs, truth = build("init_special")
    model.stem.bias.requires_grad_(False)
    assert find_scale_invariant(model, inputs) == {**truth, "stem.weight": None}


def test_weights_behind_a_zero_scale_or_a_tiny_layer_scale_have_an_effect(build):
    model, inputs, _ = build("init_special")
    report = explain_scale_invariance(model, inputs)
    assert report.decisions["branch.weight"].reason == "scale removed by branch_bn (BatchNorm2d)"
    assert report.decisions["scaled.weight"].invariant
    model.branch_bn.weight.requires_grad_(False)  # frozen at zero: no effect, ever
    reason = explain_scale_invariance(model, inputs).decisions["branch.weight"].reason
    assert "it has no effect on the output" in reason


def test_weight_standardization_is_explained(build):
    model, inputs, truth = build("standardized")
    report = explain_scale_invariance(model, inputs)
    assert report.found == truth
    for name in truth:
        assert report.decisions[name].reason.startswith("scale removed by weight standardization")
    assert "scaled.gain" not in report.decisions  # the gain is no weight of a linear map


def test_weights_are_tested_one_by_one_where_every_joint_rescaling_fails(monkeypatch, build):
    rescale = NumericProbe.rescale
    calls = []

    def joint_fails(self, groupings, gradients=False):
        calls.append(len(groupings))
        measured = rescale(self, groupings, gradients)
        if len(groupings) > 1:
            measured.change = float("inf")
        return measured

    monkeypatch.setattr(NumericProbe, "rescale", joint_fails)
    model, inputs, truth = build("mixed")
    assert find_scale_invariant(model, inputs) == truth
    assert calls[0] > 1 and calls.count(1) >= len(truth)


def test_bisection_finds_a_failing_weight_in_logarithmically_many_passes(monkeypatch, build):
    """One weight whose rescaling changes the output costs about 2 log2(n) forward passes."""
    rescale = NumericProbe.rescale
    calls = []

    def one_fails(self, groupings, gradients=False):
        calls.append(sorted(groupings))
        measured = rescale(self, groupings, gradients)
        if "conv_relu_bn.weight" in groupings:
            measured.change = 1.0
        return measured

    monkeypatch.setattr(NumericProbe, "rescale", one_fails)
    model, inputs, truth = build("mixed")
    report = explain_scale_invariance(model, inputs)
    del truth["conv_relu_bn.weight"]
    assert report.found == truth
    reason = report.decisions["conv_relu_bn.weight"].reason
    assert reason.count("rescaling its groups changes the output (relative change 1)") == 2
    rescalings = calls
    first_round = len(truth) + 1
    # the joint pass, two halves per level, the dim=None round of the failing weight
    assert len(rescalings) <= 1 + 2 * math.ceil(math.log2(first_round)) + 1
    assert rescalings[-1] == ["conv_relu_bn.weight"]


def test_float32_and_eval_mode_models_are_probed_in_training_mode(build):
    model, inputs, truth = build("vgg_bn")
    model.eval()
    assert find_scale_invariant(model, inputs) == truth


# --------------------------------------------------------- structural and numeric both needed


def test_untraceable_model_falls_back_to_the_numeric_probe(untraceable):
    with pytest.warns(UserWarning, match="cannot trace"):
        report = explain_scale_invariance(untraceable(), torch.randn(5, 3, 4, 4))
    # `dead` is unused, `zero` is zero (no point of the manifold), head is not PSI; the two
    # standardized convolutions are found by the numeric probe alone (their eps set to 1e-30)
    assert report.found == {"conv.weight": 0, "standardized.weight": 0, "std_mean_form.weight": 0}
    assert report.notes[0].startswith("not traceable (TraceError")
    assert "numeric probe only" in report.decisions["standardized.weight"].reason
    assert "no effect" in report.decisions["dead.weight"].reason
    assert "not a point" in report.decisions["zero.weight"].reason


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
    assert probe.numeric.rescale({"conv.weight": 0}).change > 1e-2  # eps alone would say "no"
    assert find_scale_invariant(model, inputs) == {"conv.weight": 0, "functional.weight": 0}


def test_weight_with_no_effect_is_not_reported(build):
    model, inputs, truth = build("mixed")
    found = find_scale_invariant(model, inputs)
    assert "no_effect.weight" not in found
    assert "no_effect.weight" not in truth


def test_zero_groups_are_rejected(build):
    """A zero row rules out per-row groups (dim=None remains, and its explanation says why not
    dim=0), a zero weight any grouping."""
    model, inputs, _ = build("mlp_bn")
    with torch.no_grad():
        model[4].weight[3].zero_()
    assert find_scale_invariant(model, inputs) == {"1.weight": 0, "4.weight": None}
    reason = explain_scale_invariance(model, inputs).decisions["4.weight"].reason
    assert "dim=0: not a point" in reason and "groups [3] along dim=0 are zero" in reason
    with torch.no_grad():
        model[4].weight.zero_()  # no point, but trained it will not stay zero: 1.weight has effect
    assert find_scale_invariant(model, inputs) == {"1.weight": 0}
    model[4].weight.requires_grad_(False)  # frozen at zero: 1.weight has no effect
    report = explain_scale_invariance(model, inputs)
    assert report.found == {}
    assert "it has no effect on the output" in report.decisions["1.weight"].reason


def test_a_model_that_needs_its_own_parameter_values_is_probed_with_them():
    """Where generic values make the forward pass fail or give non-finite outputs, the
    model's own values are probed, and the report says so."""

    class Mixture(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.share = nn.Parameter(torch.tensor(0.25))  # meaningful below 0.4 only

        def forward(self, x):
            y = self.bn(self.conv(x))
            return torch.sqrt(0.4 - self.share) * y.mean((2, 3))

    report = explain_scale_invariance(Mixture(), torch.randn(4, 3, 5, 5))
    assert report.found == {"conv.weight": 0}
    assert report.notes[0].startswith("forward with generic parameter values failed")
