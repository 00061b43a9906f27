"""Shared helpers of the tests: hypothesis strategies and helpers for the tests of
:class:`psi_geoopt.PSIManifold` and of the optimizers, and writers of small datasets in their
on-disk formats.

Groups are recomputed here independently of the manifold (move the group axis to the front
and flatten the rest), so the tests compare the manifold with a second implementation.
"""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from dataclasses import dataclass

import geoopt
import hypothesis.strategies as st
import numpy
import pytest
import torch
from torch import nn

from psi_geoopt import PSIManifold
from psi_geoopt.optim import RiemannianAdam, RiemannianSGD, _fused
from psi_geoopt.optim._closed_form import adam_hyper_parameters

TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)
TESTED_TORCH = "2.13"
"""The oldest PyTorch on which the whole suite has passed. psi_geoopt declares torch >= 2.4
(nn.RMSNorm), and its core runs on 2.4 and 2.6; the tests of what needs more (FSDP2,
torch.compile of the PSI step and of converted models) skip below this version."""


def needs_tested_torch(what: str):
    """Skip a test of ``what`` on a PyTorch older than :data:`TESTED_TORCH`."""
    return pytest.mark.skipif(
        TORCH_VERSION < TESTED_TORCH,
        reason=f"{what}: tested on torch >= {TESTED_TORCH}, this is {torch.__version__}",
    )


def group_matrix(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``t`` as a matrix with one row per group (``dim=None``: a single row)."""
    if dim is None:
        return t.reshape(1, -1)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def ungroup(matrix: torch.Tensor, shape: tuple[int, ...], dim: int | None) -> torch.Tensor:
    """Inverse of :func:`group_matrix` for a tensor of ``shape``."""
    if dim is None:
        return matrix.reshape(shape)
    moved = (shape[dim], *(n for a, n in enumerate(shape) if a != dim % len(shape)))
    return matrix.reshape(moved).movedim(0, dim)


def group_shape(shape: tuple[int, ...], dim: int | None) -> tuple[int, ...]:
    """The shape of a per-group quantity that broadcasts against a tensor of ``shape``."""
    if dim is None:
        return (1,) * len(shape)
    axis = dim % len(shape)
    return tuple(n if a == axis else 1 for a, n in enumerate(shape))


def per_group(values: torch.Tensor, shape: tuple[int, ...], dim: int | None) -> torch.Tensor:
    """One value per group (a vector) reshaped to broadcast against a tensor of ``shape``."""
    return values.reshape(group_shape(shape, dim))


def group_norms(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Per-group Euclidean norms, broadcastable against ``t``."""
    return per_group(group_matrix(t, dim).norm(dim=1), tuple(t.shape), dim)


def assert_groups_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dim: int | None,
    scale: torch.Tensor | None = None,
    rtol: float = 1e-10,
) -> None:
    """Per group, ``||actual - expected|| <= rtol * scale`` (default scale: ``||expected||``).

    Errors are measured relative to each group's own scale, so groups of very different
    magnitudes are each checked at their own precision.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    error = group_matrix((actual - expected).double(), dim).norm(dim=1)
    if scale is None:
        scale = group_matrix(expected.double(), dim).norm(dim=1)
    else:
        scale = group_matrix(scale.double().expand(expected.shape), dim).abs().amax(dim=1)
    bound = rtol * scale + torch.finfo(torch.float64).tiny
    assert bool((error <= bound).all()), f"max relative error {(error / bound).max() * rtol:.3g}"


@dataclass(frozen=True)
class Case:
    """A random PSI tensor layout: shape, group axis, seed and spread of per-group scales.

    Per-group scales are ``10 ** U(-decades, decades)``.
    """

    shape: tuple[int, ...]
    dim: int | None
    seed: int
    decades: float

    @property
    def manifold(self) -> PSIManifold:
        return PSIManifold(dim=self.dim)

    @property
    def n_groups(self) -> int:
        return 1 if self.dim is None else self.shape[self.dim]

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 7919 * offset)

    def scales(self, offset: int = 0, decades: float | None = None) -> torch.Tensor:
        """Positive per-group scales, log-uniform over ``2 * decades`` orders of magnitude."""
        decades = self.decades if decades is None else decades
        exponents = torch.rand(self.n_groups, generator=self.generator(offset), dtype=torch.float64)
        return per_group(10.0 ** (decades * (2 * exponents - 1)), self.shape, self.dim)

    def gaussian(self, offset: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator(offset), dtype=torch.float64)

    def point(self, offset: int = 0) -> torch.Tensor:
        """A float64 point whose groups have very different norms."""
        return self.gaussian(offset) * self.scales(offset)

    def vector(self, x: torch.Tensor, offset: int = 1) -> torch.Tensor:
        """An arbitrary (not horizontal) vector of the size of ``x``'s groups."""
        return self.gaussian(offset) * group_norms(x, self.dim)

    def horizontal(self, x: torch.Tensor, offset: int = 1) -> torch.Tensor:
        """A horizontal vector at ``x``, projected here without the manifold."""
        u = group_matrix(self.vector(x, offset), self.dim)
        w = group_matrix(x, self.dim)
        w_unit = w / w.norm(dim=1, keepdim=True)
        h = u - (u * w_unit).sum(dim=1, keepdim=True) * w_unit
        return ungroup(h, self.shape, self.dim)


@st.composite
def cases(draw, max_rank: int = 4, max_side: int = 4, decades: tuple[float, ...] = (0, 3, 8)):
    """Random ``Case``: rank 1..``max_rank``, any group axis (negative or ``None``)."""
    rank = draw(st.integers(1, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
    dim = draw(st.one_of(st.none(), st.integers(-rank, rank - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(shape=shape, dim=dim, seed=seed, decades=draw(st.sampled_from(decades)))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors (threads only contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_WITHOUT_CLI_EXTRA = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {"sklearn", "matplotlib", "tqdm"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
"""


@pytest.fixture
def without_cli_extra():
    """Run Python code in a fresh interpreter where the packages of the ``cli`` extra
    (scikit-learn, matplotlib, tqdm) cannot be imported, as if they were not installed;
    returns the finished :class:`subprocess.CompletedProcess`."""

    def run(code: str, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _WITHOUT_CLI_EXTRA + code, *arguments],
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


# The optimizers: parameters of every kind, fixed gradients, trajectories compared.

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


@pytest.fixture(params=["numba", "numpy"])
def cpu_step(request, monkeypatch):
    """Which implementation runs the fast path's PSI step on CPU: the compiled loop of
    :mod:`psi_geoopt.optim.kernels.numba`, or NumPy operations (as without Numba installed)."""
    if request.param == "numba":
        if _fused._kernel_module("numba") is None:
            pytest.skip("Numba is not installed")
    else:
        monkeypatch.setitem(_fused._KERNELS, "numba", None)
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


CLOSED_FORM_CASES = [
    dict(momentum=0.0, keep=1.0, first=True, nesterov=False),  # no momentum: d = g
    dict(momentum=0.9, keep=1.0, first=True, nesterov=False),
    dict(momentum=0.9, keep=1.0, first=True, nesterov=True),
    dict(momentum=0.9, keep=1.0, first=False, nesterov=False),
    dict(momentum=0.9, keep=1.0, first=False, nesterov=True),
    dict(momentum=0.5, keep=0.7, first=False, nesterov=False),  # dampening 0.3
]
"""Flag and momentum cases of the closed forms (``keep`` = 1 - dampening)."""

ADAM_CASES = [(0.9, 0.999, 1e-8, 1, False), (0.9, 0.999, 1e-8, 7, True), (0.5, 0.9, 1e-3, 30, True)]
"""``beta1, beta2, eps, step, amsgrad`` of the Adam closed form."""

CLOSED_FORM_INPUTS = ("xx", "xu", "uu", "bu", "bb", "lr", "second", "peak")
"""The per-group inputs of :func:`closed_form_outputs`."""


def closed_form_inputs(seed: int = 0, groups: int = 64, size: int = 9) -> dict[str, numpy.ndarray]:
    """Random inputs of the closed forms of :mod:`psi_geoopt.optim._closed_form`, float64:
    ``x`` (norms over four decades), ``u`` (a gradient, scaled as a scale-invariant loss's),
    ``b`` (a buffer horizontal at ``x``), ``lr`` (one per group), Adam's ``second``/``peak``
    moments, and the per-group sums ``xx, xu, uu, bu, bb`` of ``x, u, b``."""
    generator = numpy.random.default_rng(seed)
    norms = 10.0 ** generator.uniform(-2, 2, (groups, 1))
    x = generator.standard_normal((groups, size)) * norms
    u = generator.standard_normal((groups, size)) / norms
    b = generator.standard_normal((groups, size)) / norms
    b -= numpy.vecdot(b, x)[:, None] * x / numpy.vecdot(x, x)[:, None]
    return dict(
        x=x,
        u=u,
        b=b,
        lr=10.0 ** generator.uniform(-3, 0, groups),
        second=generator.uniform(0, 2, groups),
        peak=generator.uniform(0, 2, groups),
        xx=numpy.vecdot(x, x),
        xu=numpy.vecdot(x, u),
        uu=numpy.vecdot(u, u),
        bu=numpy.vecdot(b, u),
        bb=numpy.vecdot(b, b),
    )


def closed_form_outputs(forms: dict, group: dict, case: dict, adam: tuple) -> tuple:
    r"""The outputs of every closed form, ``forms`` (``gradient_norm``, ``step_coefficients``,
    ``adam_step_size``: one backend's), on the inputs ``group`` (:data:`CLOSED_FORM_INPUTS`;
    scalars or vectors): :math:`\|g\|_g^2`, the seven step coefficients, and Adam's second
    moment, maximum and learning rate (with the learning rate 0.01)."""
    beta1, beta2, eps, step, amsgrad = adam
    lr, _, _, *hyper = adam_hyper_parameters(0.01, (beta1, beta2), eps, step)
    norm = forms["gradient_norm"](group["xx"], group["xu"], group["uu"])
    gg = group["xx"] * norm
    coefficients = forms["step_coefficients"](
        group["xx"], group["xu"], gg, group["bu"], group["bb"], group["lr"], **case
    )
    moments = forms["adam_step_size"](group["second"], group["peak"], norm, lr, *hyper, amsgrad)
    return (norm, *coefficients, *moments)


# ------------------------------------------------------------------- datasets in their formats


def write_cifar(
    root, *, num_classes: int = 10, per_file: int = 40, seed: int = 0, bytes_keys: bool = False
) -> dict[str, numpy.ndarray]:
    """Write random CIFAR-10 (``num_classes=10``: five training batches and a test batch of
    ``per_file`` images) or CIFAR-100 (``100``: ``train`` and ``test`` of ``5 * per_file`` and
    ``per_file``) python pickles under ``root`` as the originals are laid out; return the
    images ``(N, 3, 32, 32)`` and labels written, per split.

    Keys are ``str`` as in the original Python 2 pickles read with ``latin1``, or ``bytes``.
    The images are learnable: each class has its own colour, plus noise.
    """
    rng = numpy.random.default_rng(seed)
    colours = rng.uniform(0, 255, (num_classes, 3, 1, 1))
    cifar10 = num_classes == 10
    folder = root / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    label_key = "labels" if cifar10 else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] if cifar10 else ["train"]
    per_train_file = per_file if cifar10 else 5 * per_file
    written = {}
    for split, names, count in (
        ("train", files, per_train_file),
        ("test", ["test_batch" if cifar10 else "test"], per_file),
    ):
        images, labels = [], []
        for name in names:
            targets = rng.integers(0, num_classes, count).tolist()
            data = _noisy(colours[targets] + rng.normal(0, 40, (count, 3, 32, 32)))
            data = data.reshape(count, 3072)
            entry = {key("data"): data, key(label_key): targets, key("batch_label"): name}
            if not cifar10:
                entry[key("coarse_labels")] = [t // 5 for t in targets]
            with (folder / name).open("wb") as file:
                pickle.dump(entry, file, protocol=2)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(targets)
        written[split] = (numpy.concatenate(images), numpy.array(labels))
    meta_name, names_key = (
        ("batches.meta", "label_names") if cifar10 else ("meta", "fine_label_names")
    )
    with (folder / meta_name).open("wb") as file:
        pickle.dump({key(names_key): [f"class{i}" for i in range(num_classes)]}, file, protocol=2)
    return written


def _noisy(values: numpy.ndarray) -> numpy.ndarray:
    return numpy.clip(numpy.rint(values), 0, 255).astype(numpy.uint8)


def write_idx(path, array: numpy.ndarray) -> None:
    """An unsigned-byte IDX file (gzipped when ``path`` ends in ``.gz``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(header + array.astype(numpy.uint8).tobytes())


def write_mnist(
    directory, *, train: int = 120, test: int = 40, seed: int = 0, gz: bool = False
) -> dict[str, numpy.ndarray]:
    """Random 28x28 MNIST-format IDX files in ``directory`` (one brightness per class, plus
    noise); the images ``(N, 28, 28)`` and labels written, per split."""
    rng = numpy.random.default_rng(seed)
    levels = rng.uniform(0, 255, (10, 1, 1))
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    written = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        labels = rng.integers(0, 10, count).astype(numpy.uint8)
        images = _noisy(levels[labels] + rng.normal(0, 40, (count, 28, 28)))
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        written[split] = (images, labels)
    return written


def write_image_folder(
    root, *, classes=("cat", "dog", "frog"), train: int = 8, test: int = 3, size=(12, 10), seed=0
) -> None:
    """PNG files ``root/{train,test}/CLASS/NNN.png`` of RGB images of ``size`` (w, h), one
    colour per class plus noise."""
    from PIL import Image

    rng = numpy.random.default_rng(seed)
    colours = rng.uniform(0, 255, (len(classes), 3))
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = _noisy(colours[label] + rng.normal(0, 40, (size[1], size[0], 3)))
                Image.fromarray(pixels).save(folder / f"{index:03d}.png")
