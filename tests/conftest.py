"""Shared hypothesis strategies and helpers for the tests of :class:`psi_geoopt.PSIManifold`.

Groups are recomputed here independently of the manifold (move the group axis to the front
and flatten the rest), so the tests compare the manifold with a second implementation.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import hypothesis.strategies as st
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
