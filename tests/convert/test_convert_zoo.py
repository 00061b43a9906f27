"""psi_geoopt.convert on untrained models of torchvision and timm, against a brute-force check.

Skipped where torchvision or timm is not installed: the project does not depend on them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from psi_geoopt import explain_scale_invariance, find_scale_invariant

LINEAR_MAPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(x)
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def _change(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(new, old, strict=True))


def brute_force(model: nn.Module, x: torch.Tensor) -> dict[str, int | None]:
    """The weights of linear-map modules whose groups (output channels, else the whole tensor)
    can be rescaled by random factors in [1/2, 2] without changing the training-mode outputs of
    a float64 copy (every other parameter random and non-zero, every ``eps`` 1e-12), and whose
    random perturbation does change them."""
    model = copy.deepcopy(model).double().train()
    x = x.double()
    generator = torch.Generator().manual_seed(7)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_MAPS):
            weights[f"{name}.weight"] = module.weight
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-12
    with torch.no_grad():
        for p in model.parameters():
            if all(p is not w for w in weights.values()):
                magnitude = 10 ** (1.5 * torch.rand(p.shape, generator=generator) - 1)
                sign = 2 * torch.randint(0, 2, p.shape, generator=generator) - 1
                p.copy_(magnitude * sign)
    reference = _outputs(model, x)
    found = {}
    for name, w in weights.items():
        original = w.detach().clone()
        for dim in (0, None):
            shape = [1] * w.dim()
            if dim is not None:
                shape[dim] = w.shape[dim]
            factors = 0.5 * 4 ** torch.rand(shape, generator=generator, dtype=torch.float64)
            with torch.no_grad():
                w.mul_(factors)
            invariant = _change(_outputs(model, x), reference) < 1e-8
            with torch.no_grad():
                w.copy_(original)
            if invariant:
                noise = torch.randn(w.shape, generator=generator, dtype=torch.float64)
                with torch.no_grad():
                    w.add_(0.1 * original.std() * noise)
                if _change(_outputs(model, x), reference) > 1e-6:
                    found[name] = dim
                with torch.no_grad():
                    w.copy_(original)
                break
    return found


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_torchvision_resnet18(images):
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    torch.manual_seed(0)
    model = models.resnet18()
    found = find_scale_invariant(model, images)
    assert found == brute_force(model, images)
    assert len(found) == 20 and "fc.weight" not in found


def test_timm_convnext_stem_and_depthwise_convolutions_are_not_psi(images):
    """Their biases are zero at initialization, but LayerNorm over channels does not remove
    a per-channel bias: the weights are not scale invariant once the biases have trained."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto")
    report = explain_scale_invariance(model, images)
    assert not report.decisions["stem.0.weight"].invariant
    assert not any(report.decisions[n].invariant for n in report.decisions if "conv_dw" in n)
    assert report.found == brute_force(model, images)


def test_timm_weight_standardized_convolutions(images):
    """timm's StdConv2d (BiT) and ScaledStdConv2d (NFNets) are PSI per output channel."""
    layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(
        layers.StdConv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        layers.ScaledStdConv2d(8, 8, 3),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    report = explain_scale_invariance(model, images)
    assert report.found == {"0.weight": 0, "3.weight": 0} == brute_force(model, images)
    assert "weight standardization" in report.decisions["3.weight"].reason


def test_the_benchmark_models_have_torchvisions_parameters():
    """psi_geoopt.experiments.large_models: torchvision's names and shapes, so its weights load."""
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    from psi_geoopt.experiments import large_models

    for ours, theirs in (
        (large_models.resnet50(), models.resnet50()),
        (large_models.efficientnet_b0(), models.efficientnet_b0()),
    ):
        ours.load_state_dict(theirs.state_dict())
