"""Tests of the training recipe: schedules with warm-up, precision, device checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from psi_geoopt.experiments.recipe import Recipe, check_device


def _factors(recipe: Recipe, total: int) -> list[float]:
    return [recipe.lr_factor(step, total) for step in range(total)]


def test_warmup_is_linear_then_the_schedule_starts_at_one():
    for schedule in ("constant", "cosine", "step"):
        factors = _factors(Recipe(schedule=schedule, warmup_steps=4), 20)
        assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_decays_from_one_towards_zero():
    factors = _factors(Recipe(schedule="cosine", warmup_steps=2), 12)
    assert factors[2] == 1.0
    assert factors[7] == pytest.approx(0.5)  # half-way through the 10 steps after warm-up
    assert all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    factors = _factors(Recipe(schedule="step"), 200)
    assert factors[99] == 1.0 and factors[100] == pytest.approx(0.1)
    assert factors[149] == pytest.approx(0.1) and factors[150] == pytest.approx(0.01)


def test_scheduler_sets_the_learning_rate_of_every_group_step_by_step():
    weight, bias = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [bias], "lr": 0.5}], lr=0.1)
    recipe = Recipe(schedule="cosine", warmup_steps=3)
    scheduler = recipe.scheduler(optimizer, total=10)
    seen = []
    for _ in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (first, second) in enumerate(seen):
        assert first == pytest.approx(0.1 * recipe.lr_factor(step, 10))
        assert second == pytest.approx(0.5 * recipe.lr_factor(step, 10))
    assert Recipe().scheduler(optimizer, total=10) is None


def test_bf16_autocast_on_the_cpu_and_fp32_untouched():
    layer = torch.nn.Linear(4, 3)
    inputs = torch.randn(2, 4)
    with Recipe(precision="bf16").autocast():
        assert layer(inputs).dtype == torch.bfloat16
    with Recipe().autocast():
        assert layer(inputs).dtype == torch.float32
    assert Recipe(precision="bf16").grad_scaler() is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"schedule": "linear"}, "schedule must be one of constant, cosine, step"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"warmup_steps": -1}, "must be >= 0"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**settings)


def test_check_device():
    assert check_device("cpu") is None
    assert "expected cpu, cuda or cuda:N" in check_device("gpu0")
    assert "not supported" in check_device("meta")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in check_device("cuda")
