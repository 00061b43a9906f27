"""Training PSI parameters with geoopt's and psi_geoopt's optimizers (PSI_GEOMETRY.md §4).

The loss is a small batch-normalized MLP written functionally, with batch normalization in
training mode and without ``eps``, so it is exactly positively scale invariant in every row of
its two hidden weights (mathematically; numerically up to rounding).
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass

import geoopt
import pytest
import torch
import torch.nn.functional as F

import psi_geoopt
from psi_geoopt import PSIManifold

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------- the PSI problem


@dataclass(frozen=True)
class Problem:
    inputs: torch.Tensor
    labels: torch.Tensor
    classifier: torch.Tensor
    initial: tuple[torch.Tensor, torch.Tensor]


def make_problem(dtype: torch.dtype = torch.float64, samples: int = 16, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 6, generator=generator, dtype=dtype)
    labels = torch.randint(0, 3, (samples,), generator=generator)
    classifier = torch.randn(3, 4, generator=generator, dtype=dtype)
    first = torch.randn(5, 6, generator=generator, dtype=dtype)
    second = torch.randn(4, 5, generator=generator, dtype=dtype)
    return Problem(inputs, labels, classifier, (first, second))


def batch_norm(z: torch.Tensor) -> torch.Tensor:
    """Training-mode batch normalization without ``eps``: invariant under column scaling."""
    centered = z - z.mean(dim=0)
    return centered / centered.pow(2).mean(dim=0).sqrt()


def psi_loss(first: torch.Tensor, second: torch.Tensor, problem: Problem, classifier=None):
    """Cross-entropy of Linear -> BN -> ReLU -> Linear -> BN -> fixed Linear."""
    dtype = torch.promote_types(first.dtype, problem.inputs.dtype)  # low precision: float32
    hidden = torch.relu(batch_norm(problem.inputs @ first.to(dtype).T))
    features = batch_norm(hidden @ second.to(dtype).T)
    classifier = problem.classifier if classifier is None else classifier
    return F.cross_entropy(features @ classifier.T.to(features.dtype), problem.labels)


def row_scales(rows: int, decades: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Per-row positive scales, log-uniform over ``[10**-decades, 10**decades]``."""
    generator = torch.Generator().manual_seed(seed)
    exponents = 2 * torch.rand(rows, 1, generator=generator, dtype=torch.float64) - 1
    return (10.0 ** (decades * exponents)).to(dtype)


def directions(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.detach().double()
    return weight / weight.norm(dim=1, keepdim=True)


def psi_parameters(weights, manifold=None) -> list[geoopt.ManifoldParameter]:
    manifold = PSIManifold(dim=0) if manifold is None else manifold
    return [geoopt.ManifoldParameter(w.clone(), manifold=manifold) for w in weights]


def train(make_optimizer, weights, problem: Problem, steps: int, manifold=None):
    """Train the two PSI weights from ``weights``; return them after each of ``steps``."""
    parameters = psi_parameters(weights, manifold)
    optimizer = make_optimizer(parameters)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        psi_loss(*parameters, problem).backward()
        optimizer.step()
        history.append([p.detach().clone() for p in parameters])
    return history


def direction_gap(left, right) -> float:
    """Largest difference of per-row unit directions between two lists of weights."""
    return max(
        float((directions(a) - directions(b)).abs().max()) for a, b in zip(left, right, strict=True)
    )


def rescaled(weights, decades: float, seed: int = 1):
    scales = [row_scales(w.shape[0], decades, seed + i, w.dtype) for i, w in enumerate(weights)]
    return [s * w for s, w in zip(scales, weights, strict=True)]


# ---------------------------------------------------------------------- equivariance

EQUIVARIANT_OPTIMIZERS = {
    "sgd": lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.3),
    "momentum": lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.1, momentum=0.9),
    "nesterov": lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "nesterov_reference_loop": lambda p: psi_geoopt.optim.RiemannianSGD(
        p, lr=0.05, momentum=0.9, nesterov=True, foreach=False
    ),
    "weight_decay": lambda p: psi_geoopt.optim.RiemannianSGD(
        p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2
    ),
    "adam": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.03),
    "amsgrad": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.03, amsgrad=True),
    "adam_weight_decay": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.03, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", EQUIVARIANT_OPTIMIZERS)
def test_equivalent_points_follow_equivalent_trajectories(name):
    """Training from W0 and from S W0 (S per row, 1e-3...1e3) gives S-equivalent iterates."""
    problem = make_problem()
    weights = problem.initial
    make_optimizer = EQUIVARIANT_OPTIMIZERS[name]
    reference = train(make_optimizer, weights, problem, 200)
    scaled = train(make_optimizer, rescaled(weights, 3.0), problem, 200)
    assert direction_gap(reference[0], scaled[0]) < 1e-9, "not equivariant at the first step"
    assert direction_gap(reference[-1], scaled[-1]) < 1e-9
    # the runs really moved, and the loss went down
    assert direction_gap(weights, reference[-1]) > 0.1
    assert psi_loss(*reference[-1], problem) < psi_loss(*weights, problem)


def test_geoopt_sgd_with_momentum_is_not_equivariant_at_the_first_step():
    """geoopt's RiemannianSGD starts its momentum buffer from the Euclidean gradient, which
    scales as 1/c: this is why psi_geoopt.optim.RiemannianSGD exists. If this test fails,
    geoopt has fixed it."""
    problem = make_problem()

    def make_optimizer(parameters):
        return geoopt.optim.RiemannianSGD(parameters, lr=0.1, momentum=0.9)

    reference = train(make_optimizer, problem.initial, problem, 1)
    scaled = train(make_optimizer, rescaled(problem.initial, 3.0), problem, 1)
    assert direction_gap(reference[0], scaled[0]) > 1e-2


def test_euclidean_sgd_is_not_equivariant():
    problem = make_problem()
    runs = []
    for weights in (problem.initial, rescaled(problem.initial, 1.0)):
        parameters = [w.clone().requires_grad_(True) for w in weights]
        optimizer = torch.optim.SGD(parameters, lr=0.3)
        for _ in range(10):
            optimizer.zero_grad()
            psi_loss(*parameters, problem).backward()
            optimizer.step()
        runs.append(parameters)
    assert direction_gap(*runs) > 1e-2


def test_unit_rows_follow_geoopt_sphere_sgd_step_for_step():
    """On unit-norm rows PSI RiemannianSGD is geoopt's Sphere + RiemannianSGD."""
    problem = make_problem()
    unit = [directions(w) for w in problem.initial]
    psi = train(lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.3), unit, problem, 100)
    sphere = train(
        lambda p: geoopt.optim.RiemannianSGD(p, lr=0.3), unit, problem, 100, geoopt.Sphere()
    )
    for psi_step, sphere_step in zip(psi, sphere, strict=True):
        for a, b in zip(psi_step, sphere_step, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert direction_gap(unit, psi[-1]) > 0.1


def rayleigh_gradient(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    r"""Gradient of the PSI loss :math:`\sum_k w_k^\top A w_k / \|w_k\|^2` (one row, one
    group): :math:`2 (A w_k - f_k w_k) / \|w_k\|^2`, in closed form to keep 3000 steps cheap."""
    image = weight @ matrix
    squared = weight.pow(2).sum(dim=1, keepdim=True)
    quotient = (image * weight).sum(dim=1, keepdim=True) / squared
    return 2 * (image - quotient * weight) / squared


@pytest.mark.parametrize(
    ("dtype", "tolerance", "foreach", "compile"),
    [
        (torch.float64, 1e-9, None, None),
        (torch.float32, 1e-5, False, None),
        (torch.float32, 1e-5, None, None),
        (torch.float32, 1e-5, None, False),
    ],
    ids=["float64", "float32_reference_loop", "float32_fast_path", "float32_fast_path_eager"],
)
def test_representative_norm_is_kept_over_thousands_of_steps(dtype, tolerance, foreach, compile):
    """Relative drift of every row's norm after 3000 small steps of stochastic gradient
    descent with Nesterov momentum (a Rayleigh quotient plus gradient noise that keeps every
    step at about 1e-4 rad, where rounding errors would accumulate)."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    matrix = (matrix + matrix.T).to(dtype)
    start = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    start = (start * row_scales(6, 3.0, seed=4)).to(dtype)
    (parameter,) = psi_parameters([start])
    optimizer = psi_geoopt.optim.RiemannianSGD(
        [parameter], lr=0.01, momentum=0.9, nesterov=True, foreach=foreach, compile=compile
    )
    for _ in range(3000):
        weight = parameter.detach()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(dtype)
        noise /= weight.norm(dim=1, keepdim=True)  # a PSI gradient scales as 1 / |w|
        parameter.grad = 1e-2 * noise - rayleigh_gradient(weight, matrix)
        optimizer.step()
    drift = float(
        (parameter.detach().double().norm(dim=1) / start.double().norm(dim=1) - 1).abs().max()
    )
    assert drift < tolerance, (
        f"{dtype} norm drift {drift:.2e} after 3000 steps (foreach={foreach}): rescaling "
        "x + u by sqrt(|x|^2 / |x + u|^2), a factor that rounds to 1 for small steps, lets the "
        "norm grow by |u|^2 / (2 |x|) per step"
    )
    assert direction_gap([start], [parameter]) > 0.1


# ---------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    ("dtype", "decades", "tolerance"),
    [(torch.float32, 6.0, 1e-4), (torch.float64, 100.0, 1e-9)],
)
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_extreme_scales_give_the_directions_of_scale_one(dtype, decades, tolerance, name):
    """Per-row scales 1e-6...1e6 (float32) and 1e-100...1e100 (float64)."""
    problem = make_problem(dtype)
    make_optimizer = EQUIVARIANT_OPTIMIZERS[name]
    reference = train(make_optimizer, problem.initial, problem, 20)[-1]
    weights = []
    for seed, w in enumerate(problem.initial):
        scales = row_scales(w.shape[0], decades, seed)
        scales[0], scales[1] = 10.0**decades, 10.0**-decades  # both ends of the range
        weights.append(w * scales.to(dtype))
    scaled = train(make_optimizer, weights, problem, 20)[-1]
    for start, end in zip(weights, scaled, strict=True):
        assert end.dtype == dtype
        assert bool(end.isfinite().all())
        torch.testing.assert_close(end.norm(dim=1), start.norm(dim=1), rtol=10 * tolerance, atol=0)
    assert direction_gap(reference, scaled) < tolerance


LOW_PRECISION_OPTIMIZERS = {
    "momentum": lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: geoopt.optim.RiemannianAdam(p, lr=0.03, amsgrad=True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOW_PRECISION_OPTIMIZERS)
def test_low_precision_parameters_train(dtype, name):
    """float16/bfloat16 parameters keep their dtype and track the float32 run."""
    problem = make_problem(torch.float32)
    make_optimizer = LOW_PRECISION_OPTIMIZERS[name]
    reference = train(make_optimizer, problem.initial, problem, 10)[-1]
    weights = [(w * 100).to(dtype) for w in problem.initial]  # squares past float16's range
    low = train(make_optimizer, weights, problem, 10)[-1]
    for start, end in zip(weights, low, strict=True):
        assert end.dtype == dtype
        assert bool(end.isfinite().all())
        torch.testing.assert_close(
            end.float().norm(dim=1), start.float().norm(dim=1), rtol=4e-2, atol=0
        )
    assert direction_gap(reference, low) < 0.1
    assert direction_gap(weights, low) > 0.1


# ---------------------------------------------------------------------- learning-rate schedules


def test_angle_of_each_step_follows_the_scheduled_learning_rate():
    r"""Without momentum a PSI SGD step turns each row by :math:`\arctan(\eta_t \|grad\|_g)`."""
    problem = make_problem()
    parameters = psi_parameters(rescaled(problem.initial, 3.0))
    optimizer = psi_geoopt.optim.RiemannianSGD(parameters, lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    manifold = parameters[0].manifold
    learning_rates = []
    for _ in range(6):
        optimizer.zero_grad()
        psi_loss(*parameters, problem).backward()
        before = [p.detach().clone() for p in parameters]
        gradient_norms = [manifold.norm(p, manifold.egrad2rgrad(p, p.grad)) for p in parameters]
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        learning_rates.append(learning_rate)
        for start, end, norm in zip(before, parameters, gradient_norms, strict=True):
            torch.testing.assert_close(
                manifold.dist(start, end), torch.atan(learning_rate * norm), rtol=1e-10, atol=1e-13
            )
    assert learning_rates == [0.4, 0.4, 0.2, 0.2, 0.1, 0.1]


# ---------------------------------------------------------------------- modules, state, copies


class BatchNormMLP(torch.nn.Module):
    """The PSI problem as a module: two PSI weights and a trainable Euclidean classifier."""

    def __init__(self, problem: Problem, scale: float = 1.0):
        super().__init__()
        first, second = (w * scale for w in problem.initial)
        self.first = geoopt.ManifoldParameter(first.clone(), manifold=PSIManifold(dim=0))
        self.second = geoopt.ManifoldParameter(second.clone(), manifold=PSIManifold(dim=-2))
        self.classifier = torch.nn.Parameter(problem.classifier.clone())

    def forward(self, problem: Problem) -> torch.Tensor:
        return psi_loss(self.first, self.second, problem, self.classifier)


def fit(model, optimizer, scheduler, problem, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(problem).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def resumable_riemannian_adam() -> type:
    """The RiemannianAdam whose checkpoints resume bit-exactly: psi_geoopt.optim's drop-in.

    geoopt's cannot (see ``test_geoopt_adam_does_not_resume_bit_exactly``).
    """
    assert hasattr(psi_geoopt.optim, "RiemannianAdam"), (
        "psi_geoopt.optim.RiemannianAdam is missing: geoopt.optim.RiemannianAdam keeps an int "
        "state['step'] that torch.optim.Adam.load_state_dict turns into a float32 tensor, so "
        "its bias corrections change after a resume"
    )
    return psi_geoopt.optim.RiemannianAdam


RESUMABLE = {
    "sgd_step_lr": (
        lambda p: psi_geoopt.optim.RiemannianSGD(
            p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, stabilize=3
        ),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    ),
    "nesterov_cosine": (
        lambda p: psi_geoopt.optim.RiemannianSGD(p, lr=0.1, momentum=0.8, nesterov=True),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ),
    "adam_step_lr": (
        lambda p: resumable_riemannian_adam()(p, lr=0.03, weight_decay=1e-3, stabilize=2),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.7),
    ),
    "amsgrad_cosine": (
        lambda p: resumable_riemannian_adam()(p, lr=0.03, amsgrad=True),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ),
}


def checkpoint_round_trip(make_optimizer, make_scheduler, steps: int = 4):
    """An uninterrupted run of ``2 * steps`` and a run resumed from a checkpoint at ``steps``.

    The checkpoint goes through ``torch.save`` into a fresh model, optimizer and scheduler.
    """
    problem = make_problem()

    def fresh(scale: float):
        model = BatchNormMLP(problem, scale)
        optimizer = make_optimizer(model.parameters())
        return model, optimizer, make_scheduler(optimizer)

    uninterrupted = fresh(1.0)
    fit(*uninterrupted, problem, 2 * steps)
    first_half = fresh(1.0)
    fit(*first_half, problem, steps)
    buffer = io.BytesIO()
    torch.save([part.state_dict() for part in first_half], buffer)
    buffer.seek(0)
    resumed = fresh(7.0)  # a different starting point, overwritten by the checkpoint
    for part, state in zip(resumed, torch.load(buffer, weights_only=True), strict=True):
        part.load_state_dict(state)
    fit(*resumed, problem, steps)
    return uninterrupted, resumed


@pytest.mark.parametrize("name", RESUMABLE)
def test_resuming_from_a_state_dict_is_bit_exact(name):
    uninterrupted, resumed = checkpoint_round_trip(*RESUMABLE[name])
    model, optimizer, scheduler = resumed
    assert isinstance(model.first, geoopt.ManifoldParameter)
    for (key, expected), actual in zip(
        uninterrupted[0].state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), key
    states = [optimizer.state[p] for p in model.parameters()]
    expected_states = [uninterrupted[1].state[p] for p in uninterrupted[0].parameters()]
    for expected, actual in zip(expected_states, states, strict=True):
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(torch.as_tensor(expected[key]), torch.as_tensor(actual[key])), key
    assert scheduler.get_last_lr() == uninterrupted[2].get_last_lr()


def test_geoopt_adam_does_not_resume_bit_exactly():
    """Why psi_geoopt.optim needs its own RiemannianAdam: geoopt's keeps ``state["step"]`` as
    an int, ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns it into a
    float32 tensor, and the bias corrections ``1 - beta ** step`` are then float32. If this
    test fails, geoopt or torch has changed and the drop-in may no longer be needed."""
    uninterrupted, resumed = checkpoint_round_trip(
        lambda p: geoopt.optim.RiemannianAdam(p, lr=0.03),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.7),
    )
    assert not torch.equal(uninterrupted[0].first, resumed[0].first)
    assert torch.is_tensor(resumed[1].state[resumed[0].first]["step"])


def _assert_same_psi_model(original: BatchNormMLP, copied: BatchNormMLP) -> None:
    for name in ("first", "second"):
        a, b = getattr(original, name), getattr(copied, name)
        assert type(b) is geoopt.ManifoldParameter
        assert isinstance(b.manifold, PSIManifold) and b.manifold.dim == a.manifold.dim
        assert b.requires_grad
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize(
    "duplicate",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_copies_keep_manifold_parameters_and_train_identically(duplicate):
    problem = make_problem()
    original = BatchNormMLP(problem, 10.0)
    copied = duplicate(original)
    _assert_same_psi_model(original, copied)
    for model in (original, copied):
        optimizer = psi_geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1, momentum=0.9)
        fit(model, optimizer, None, problem, 5)
    for a, b in zip(original.parameters(), copied.parameters(), strict=True):
        assert torch.equal(a, b)


def test_whole_model_survives_torch_save():
    problem = make_problem()
    original = BatchNormMLP(problem)
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    _assert_same_psi_model(original, torch.load(buffer, weights_only=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_module_to_dtype_keeps_manifold_parameters(dtype):
    problem = make_problem()
    model = BatchNormMLP(problem)
    manifolds = (model.first.manifold, model.second.manifold)
    model.to(dtype)
    assert (model.first.manifold, model.second.manifold) == manifolds
    for parameter in (model.first, model.second):
        assert type(parameter) is geoopt.ManifoldParameter
        assert parameter.dtype == dtype
    norms = model.first.detach().double().norm(dim=1)
    optimizer = psi_geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(model, optimizer, None, problem, 2)
    assert model.first.dtype == dtype
    torch.testing.assert_close(
        model.first.detach().double().norm(dim=1), norms, rtol=16 * torch.finfo(dtype).eps, atol=0
    )


def test_stabilize_does_not_change_the_trajectory():
    problem = make_problem()
    runs = [
        train(
            lambda p, every=every: psi_geoopt.optim.RiemannianSGD(
                p, lr=0.1, momentum=0.9, stabilize=every
            ),
            problem.initial,
            problem,
            30,
        )[-1]
        for every in (None, 1)
    ]
    assert direction_gap(*runs) < 1e-12


def test_psi_sgd_leaves_the_gradient_untouched():
    """Weight decay is not written into ``p.grad`` (geoopt's RiemannianSGD does that)."""
    problem = make_problem()
    parameters = psi_parameters(problem.initial)
    optimizer = psi_geoopt.optim.RiemannianSGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.1)
    psi_loss(*parameters, problem).backward()
    gradients = [p.grad.clone() for p in parameters]
    optimizer.step()
    for gradient, parameter in zip(gradients, parameters, strict=True):
        assert torch.equal(gradient, parameter.grad)
