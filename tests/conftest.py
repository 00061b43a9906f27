"""Shared helpers of the tests: hypothesis strategies and helpers for the tests of
:class:`psi_geoopt.PSIManifold`, and writers of small datasets in their on-disk formats.

Groups are recomputed here independently of the manifold (move the group axis to the front
and flatten the rest), so the tests compare the manifold with a second implementation.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass

import hypothesis.strategies as st
import numpy as np
import pytest
import torch

from psi_geoopt import PSIManifold


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


# ------------------------------------------------------------------- datasets in their formats


def write_cifar(
    root, *, num_classes: int = 10, per_file: int = 40, seed: int = 0, bytes_keys: bool = False
) -> dict[str, np.ndarray]:
    """Write random CIFAR-10 (``num_classes=10``: five training batches and a test batch of
    ``per_file`` images) or CIFAR-100 (``100``: ``train`` and ``test`` of ``5 * per_file`` and
    ``per_file``) python pickles under ``root`` as the originals are laid out; return the
    images ``(N, 3, 32, 32)`` and labels written, per split.

    Keys are ``str`` as in the original Python 2 pickles read with ``latin1``, or ``bytes``.
    The images are learnable: each class has its own colour, plus noise.
    """
    rng = np.random.default_rng(seed)
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
        written[split] = (np.concatenate(images), np.array(labels))
    meta_name, names_key = (
        ("batches.meta", "label_names") if cifar10 else ("meta", "fine_label_names")
    )
    with (folder / meta_name).open("wb") as file:
        pickle.dump({key(names_key): [f"class{i}" for i in range(num_classes)]}, file, protocol=2)
    return written


def _noisy(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def write_idx(path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzipped when ``path`` ends in ``.gz``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_mnist(
    directory, *, train: int = 120, test: int = 40, seed: int = 0, gz: bool = False
) -> dict[str, np.ndarray]:
    """Random 28x28 MNIST-format IDX files in ``directory`` (one brightness per class, plus
    noise); the images ``(N, 28, 28)`` and labels written, per split."""
    rng = np.random.default_rng(seed)
    levels = rng.uniform(0, 255, (10, 1, 1))
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    written = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
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

    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, (len(classes), 3))
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = _noisy(colours[label] + rng.normal(0, 40, (size[1], size[0], 3)))
                Image.fromarray(pixels).save(folder / f"{index:03d}.png")
