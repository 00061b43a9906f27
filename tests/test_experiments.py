"""Tests of psi_geoopt.experiments: data, models, optimizer registry, the training loop and
the figures."""

from __future__ import annotations

import importlib.util

import geoopt
import numpy as np
import pytest
import torch
from conftest import write_cifar, write_image_folder

import psi_geoopt
from psi_geoopt import PSIManifold
from psi_geoopt.experiments import data
from psi_geoopt.experiments.data import IN_MEMORY_DATASETS, load_dataset
from psi_geoopt.experiments.formats import ImageSplits
from psi_geoopt.experiments.images import ImageDataset
from psi_geoopt.experiments.models import MODELS, build_model, rescale
from psi_geoopt.experiments.optimizers import OPTIMIZERS, build_optimizer, to_unit_sphere
from psi_geoopt.experiments.plots import Curve
from psi_geoopt.experiments.recipe import Recipe
from psi_geoopt.experiments.training import (
    evaluate,
    scale_invariant_weights,
    train,
    train_from_scratch,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _batch(dtype=torch.float32) -> torch.Tensor:
    return load_dataset("digits").train_inputs[:32].to(dtype)


def _psi_weights(model) -> dict[str, int | None]:
    return psi_geoopt.find_scale_invariant(model, _batch(next(model.parameters()).dtype))


# ------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", IN_MEMORY_DATASETS)
def test_dataset_shapes_classes_and_fixed_split(name):
    dataset = load_dataset(name)
    assert dataset.train_inputs.shape[1:] == (1, 8, 8) == dataset.test_inputs.shape[1:]
    assert dataset.train_inputs.dtype == torch.float32
    assert len(dataset.train_inputs) == len(dataset.train_targets)
    assert set(dataset.train_targets.tolist()) == set(range(10))
    assert set(dataset.test_targets.tolist()) <= set(range(10))
    data._in_memory.cache_clear()
    again = load_dataset(name)
    assert torch.equal(again.train_inputs, dataset.train_inputs)
    assert torch.equal(again.test_targets, dataset.test_targets)


def test_digits_split_and_standardization(digits):
    assert (len(digits.train_targets), len(digits.test_targets)) == (1347, 450)
    mean = digits.train_inputs.flatten(1).mean(0)
    assert mean.abs().max() < 1e-5
    std = digits.train_inputs.flatten(1).std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-4).sum() >= 60  # a few border pixels are constant


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match=r"digits, synthetic, cifar10, .*, imagefolder"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODELS)
def test_models_output_and_seeded_initialization(name):
    model = build_model(name, seed=3)
    assert model(_batch()).shape == (32, 10)
    same = build_model(name, seed=3)
    other = build_model(name, seed=4)
    first = next(model.parameters())
    assert torch.equal(first, next(same.parameters()))
    assert not torch.equal(first, next(other.parameters()))


def test_scale_invariant_weights_of_the_residual_models():
    plain = _psi_weights(build_model("resnet", 0).double())
    convolutions = [n for n, p in build_model("resnet", 0).named_parameters() if p.ndim == 4]
    assert sorted(plain) == sorted(convolutions)
    preact = _psi_weights(build_model("preact-resnet", 0).double())
    assert "1.conv1.weight" in preact and "2.conv1.weight" in preact
    # added to a shortcut: not scale invariant
    assert "1.conv2.weight" not in preact and "2.conv2.weight" not in preact
    assert "0.weight" not in preact


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="mlp-bn, convnet-bn, resnet, preact-resnet"):
        build_model("vgg", 0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_builtin_models_take_any_image_shape(name, shape):
    model = build_model(name, 0, num_classes=7, input_shape=shape)
    assert model(torch.randn(4, *shape)).shape == (4, 7)


def test_zoo_models_need_their_package(monkeypatch):
    from psi_geoopt.experiments import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the package 'timm': pip install timm"):
        build_model("timm:resnet18", 0)
    assert "torchvision:NAME, timm:NAME" in models.check_model_name("keras:resnet")


_NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
_NO_TIMM = importlib.util.find_spec("timm") is None


@pytest.mark.skipif(_NO_TORCHVISION, reason="torchvision is not installed (optional)")
def test_torchvision_resnet_with_the_cifar_stem():
    model = build_model("torchvision:resnet18", 3, 10, (3, 8, 8), cifar_stem=True)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)
    inputs = torch.randn(4, 3, 8, 8)
    assert model(inputs).shape == (4, 10)
    same = build_model("torchvision:resnet18", 3, 10, (3, 8, 8), cifar_stem=True)
    assert torch.equal(model.conv1.weight, same.conv1.weight)
    plain = build_model("torchvision:resnet18", 3, 10, (1, 32, 32))
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.in_channels == 1


@pytest.mark.skipif(_NO_TORCHVISION, reason="torchvision is not installed (optional)")
def test_torchvision_vgg_with_the_cifar_head_and_refused_architectures():
    model = build_model("torchvision:vgg11_bn", 0, 10, (1, 32, 32), cifar_stem=True)
    assert model.features[0].in_channels == 1
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.in_features == 512
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="cannot adapt 'torchvision:mobilenet_v2'"):
        build_model("torchvision:mobilenet_v2", 0, 10, (3, 32, 32), cifar_stem=True)
    with pytest.raises(ValueError, match="torchvision has no classification model 'fcn_resnet50'"):
        build_model("torchvision:fcn_resnet50", 0)


@pytest.mark.skipif(_NO_TIMM, reason="timm is not installed (optional)")
def test_timm_deep_stem_resnet_with_the_cifar_stem():
    model = build_model("timm:test_resnet", 0, 10, (1, 8, 8), cifar_stem=True)
    assert model.conv1[0].stride == (1, 1) and model.conv1[0].in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    # timm zero-initializes the last BN scale of each block: the probe sets it to one
    images = np.random.default_rng(0).integers(0, 256, (8, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(8) % 2
    tiny = ImageDataset.from_splits("tiny", ImageSplits(images, labels, images, labels, ("a", "b")))
    psi = scale_invariant_weights("timm:test_resnet", tiny, batch_size=8, cifar_stem=True)
    convolutions = [n for n, p in model.named_parameters() if p.ndim == 4]
    assert sorted(psi) == sorted(convolutions) and "fc.weight" not in psi


@pytest.mark.parametrize("epsilon, tolerance", [(1e-30, 1e-10), (1e-5, 1e-4)])
def test_rescale_keeps_the_training_function_and_scales_each_channel(epsilon, tolerance):
    """Exact with a negligible BN epsilon; with the default one, up to about epsilon / variance."""
    model = build_model("convnet-bn", 0).double()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = epsilon
    scale_invariant = _psi_weights(model)
    assert len(scale_invariant) == 3
    inputs = _batch(torch.float64)
    before = {name: p.clone() for name, p in model.named_parameters()}
    reference = model(inputs)
    factors = {
        name: torch.linspace(1.0, 10.0, before[name].shape[dim], dtype=torch.float64)
        for name, dim in scale_invariant.items()
    }
    rescale(model, scale_invariant, factors)
    torch.testing.assert_close(model(inputs), reference, rtol=0, atol=tolerance)
    for name, parameter in model.named_parameters():
        if name in scale_invariant:
            expected = before[name] * factors[name].reshape(-1, 1, 1, 1)
            torch.testing.assert_close(parameter, expected)
        else:
            assert torch.equal(parameter, before[name])
    with pytest.raises(ValueError, match="positive"):
        rescale(model, scale_invariant, -1.0)


# ------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_mlp_bn(name, digits):
    model = build_model("mlp-bn", 0)
    scale_invariant = _psi_weights(model)
    optimizer = build_optimizer(
        name, model, scale_invariant, _batch(), OPTIMIZERS[name].reference_lr
    )
    result = train(model, optimizer, digits, steps=30, seed=0, log_every=10)
    assert not result.diverged
    assert result.loss_curve[-1] < result.loss_curve[0]
    manifold_parameters = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    if name.startswith("psi"):
        assert len(manifold_parameters) == len(scale_invariant)
        assert all(isinstance(p.manifold, PSIManifold) for p in manifold_parameters)
    elif name == "sphere":
        assert all(isinstance(p.manifold, geoopt.Sphere) for p in manifold_parameters)
    else:
        assert not manifold_parameters


def test_unknown_optimizer_and_bad_lr():
    model = build_model("mlp-bn", 0)
    with pytest.raises(ValueError, match="psi-sgd, psi-sgd-momentum, psi-adam, sgd"):
        build_optimizer("lamb", model, {}, _batch(), 0.1)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer("sgd", model, {}, _batch(), -0.1)


@pytest.mark.parametrize("name", ["convnet-bn", "preact-resnet"])
def test_unit_sphere_storage_keeps_the_training_function(name):
    model = build_model(name, 0).double()
    scale_invariant = _psi_weights(model)
    inputs = _batch(torch.float64)
    reference = model(inputs)
    to_unit_sphere(model, scale_invariant)
    rows = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    assert len(rows) == len(scale_invariant)
    for row in rows:
        torch.testing.assert_close(row.norm(dim=1), torch.ones(len(row), dtype=torch.float64))
    # equal up to BN's epsilon (see the rescale test)
    torch.testing.assert_close(model(inputs), reference, rtol=0, atol=1e-4)


def test_sphere_matches_psi_sgd_momentum_step_for_step():
    """Equivariant PSI SGD from any representative = Riemannian SGD on the unit sphere."""
    dataset = load_dataset("digits")
    dataset64 = type(dataset)(
        "digits64",
        dataset.train_inputs.double(),
        dataset.train_targets,
        dataset.test_inputs.double(),
        dataset.test_targets,
    )
    curves = {}
    for name in ("psi-sgd-momentum", "sphere", "sgd-momentum"):
        model = build_model("mlp-bn", 0).double()
        scale_invariant = _psi_weights(model)
        rescale(model, scale_invariant, 3.0)
        optimizer = build_optimizer(name, model, scale_invariant, dataset64.train_inputs[:64], 0.05)
        curves[name] = torch.tensor(
            train(model, optimizer, dataset64, steps=20, seed=0, log_every=1).loss_curve
        )
    torch.testing.assert_close(curves["psi-sgd-momentum"], curves["sphere"], rtol=1e-4, atol=1e-4)
    assert (curves["sgd-momentum"] - curves["sphere"]).abs().max() > 1e-2


# --------------------------------------------------------------------------------- training


def _run(optimizer: str, init_scale, steps: int = 20, **kwargs):
    return train_from_scratch(
        "mlp-bn",
        optimizer,
        load_dataset("digits"),
        lr=0.3,
        seed=1,
        init_scale=init_scale,
        steps=steps,
        log_every=1,
        **kwargs,
    )


def test_training_is_deterministic_for_a_seed():
    first, second = _run("psi-sgd", 1.0).as_dict(), _run("psi-sgd", 1.0).as_dict()
    for timing in ("wall_s", "images_per_s"):
        first.pop(timing), second.pop(timing)
    assert first == second
    other = train_from_scratch(
        "mlp-bn", "psi-sgd", load_dataset("digits"), lr=0.3, seed=2, steps=20, log_every=1
    )
    assert other.loss_curve != first["loss_curve"]


def test_psi_training_ignores_the_initial_scale_and_sgd_does_not():
    psi = [torch.tensor(_run("psi-sgd", scale).loss_curve) for scale in (1.0, 4.0)]
    sgd = [torch.tensor(_run("sgd", scale).loss_curve) for scale in (1.0, 4.0)]
    assert (psi[0] - psi[1]).abs().max() < 1e-3
    assert (sgd[0] - sgd[1]).abs().max() > 0.1


def test_train_measurements(digits):
    result = _run("sgd", 1.0, steps=40, target_loss=1.0)
    assert len(result.loss_curve) == 40
    assert result.steps_to_target == 1 + next(i for i, v in enumerate(result.loss_curve) if v <= 1)
    assert 0 < result.final_train_loss < result.loss_curve[0]
    for accuracy in (result.test_accuracy, result.train_mode_accuracy, result.train_accuracy):
        assert 0.5 < accuracy <= 1
    never = _run("sgd", 1.0, steps=5, target_loss=1e-9)
    assert never.steps_to_target is None


def test_last_partial_window_is_logged(digits):
    """25 steps in windows of 10: three entries, the last the mean of steps 21-25."""
    losses = []
    result = train_from_scratch(
        "mlp-bn",
        "sgd",
        digits,
        lr=0.3,
        seed=1,
        steps=25,
        log_every=10,
        target_loss=100.0,
        on_step=lambda step, loss: losses.append(loss),
    )
    assert len(losses) == 25 and len(result.loss_curve) == 3
    assert result.loss_curve[0] == pytest.approx(sum(losses[:10]) / 10)
    assert result.loss_curve[2] == pytest.approx(sum(losses[20:]) / 5)
    assert result.steps_to_target == 10
    short = train_from_scratch(
        "mlp-bn", "sgd", digits, lr=0.3, seed=1, steps=5, log_every=10, target_loss=100.0
    )
    assert len(short.loss_curve) == 1 and short.steps_to_target == 5
    curve = Curve("sgd", result.loss_curve, 10, steps=25)
    assert curve.window_ends().tolist() == [10, 20, 25]


def test_init_scale_and_channel_factors_compose(digits):
    """``channel_factors`` apply on top of ``init_scale``: 2 then 2 per channel is 4."""
    factors = {
        name: torch.full((build_model("mlp-bn", 1).get_parameter(name).shape[0],), 2.0)
        for name in _psi_weights(build_model("mlp-bn", 1))
    }
    curves = [
        train_from_scratch(
            "mlp-bn", "sgd", digits, lr=0.3, seed=1, steps=20, log_every=1, **options
        ).loss_curve
        for options in (
            {"init_scale": 4.0},
            {"init_scale": 2.0, "channel_factors": factors},
            {"init_scale": 2.0},
        )
    ]
    assert curves[0] == curves[1] != curves[2]


def test_divergence_is_reported_not_raised():
    result = _run("sgd", 1.0, steps=10)
    assert not result.diverged
    exploded = train_from_scratch(
        "mlp-bn", "sgd", load_dataset("digits"), lr=1e30, seed=0, steps=10, log_every=1
    )
    assert exploded.diverged and exploded.final_train_loss is None


def test_evaluate_with_batch_statistics_keeps_running_statistics(digits):
    model = build_model("mlp-bn", 0)
    model.train()
    model(digits.train_inputs[:64])
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    test_set = [(digits.test_inputs, digits.test_targets)]
    loss, accuracy = evaluate(model, test_set, batch_statistics=True)
    assert loss > 0 and 0 <= accuracy <= 1
    assert model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name])
    evaluate(model, test_set, batch_statistics=False)
    assert model.training


def test_train_rejects_bad_settings(digits):
    model = build_model("mlp-bn", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        train(model, optimizer, digits, steps=0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train(model, optimizer, digits, steps=1, seed=0, batch_size=10_000)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_file=40)
    return load_dataset("cifar10", root)


def _recipe_run(dataset, optimizer: str = "psi-sgd-momentum", batch_size: int = 40, **settings):
    recipe = Recipe(**{"schedule": "cosine", "warmup_steps": 2, "augment": "crop-flip", **settings})
    return train_from_scratch(
        "mlp-bn",
        optimizer,
        dataset,
        lr=0.03,
        seed=0,
        init_scale=3.0,
        steps=15,
        batch_size=batch_size,
        log_every=5,
        recipe=recipe,
    )


def test_a_recipe_run_on_cifar_files_trains(cifar):
    result = _recipe_run(cifar)
    assert len(result.loss_curve) == 3 and result.loss_curve[-1] < result.loss_curve[0]
    assert result.final_train_loss < result.loss_curve[0] and not result.diverged
    assert result.test_accuracy > 0.3  # ten classes, one colour each
    assert result.images_per_s > 0
    bf16 = _recipe_run(cifar, precision="bf16")
    torch.testing.assert_close(
        torch.tensor(bf16.loss_curve), torch.tensor(result.loss_curve), atol=0.05, rtol=0
    )


def test_a_recipe_run_is_reproducible(tmp_path):
    """The same seed, the same numbers (8x8 images: a short run)."""
    write_image_folder(tmp_path, train=20, test=4, size=(8, 8))
    folder = load_dataset("imagefolder", tmp_path, image_size=8)
    first, second = (_recipe_run(folder, batch_size=15).as_dict() for _ in range(2))
    for timing in ("wall_s", "images_per_s"):
        first.pop(timing), second.pop(timing)
    assert first == second
    assert first["loss_curve"] != _recipe_run(folder, batch_size=15, augment="none").loss_curve


def test_psi_weights_of_a_model_on_image_data(cifar):
    found = scale_invariant_weights("convnet-bn", cifar, batch_size=40)
    assert sorted(found) == ["0.weight", "3.weight", "7.weight"]
    assert all(dim == 0 for dim in found.values())
