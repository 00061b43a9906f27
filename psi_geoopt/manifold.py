r"""The positive-scale-invariant (PSI) quotient manifold as a :class:`geoopt.Manifold`."""

from __future__ import annotations

import torch
from geoopt import ManifoldTensor
from geoopt.manifolds.base import Manifold
from geoopt.utils import size2shape

__all__ = ["PSIManifold"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_LISTED_GROUPS = 10


class PSIManifold(Manifold):
    r"""The quotient of :math:`\mathbb{R}^d \setminus \{0\}` by positive rescaling, group by group.

    A tensor :math:`W` is split into groups along the axis ``dim`` exactly as
    :func:`torch.nn.utils.weight_norm` does: with ``dim=0`` every index of axis 0 (an output
    channel of a ``Linear``/``Conv`` weight) is one group made of all the other axes; with
    ``dim=None`` the whole tensor is one group. Write :math:`w` for one group flattened to a
    vector, :math:`r = \|w\|` and :math:`\hat w = w / r`. The point :math:`w` represents the ray
    :math:`[w] = \{c\, w : c > 0\}`; a valid point has every group finite and non-zero.

    The metric is invariant under the action :math:`w \mapsto c\, w`,

    .. math::

        g_w(u, v) = \frac{\langle u, v \rangle}{r^2},

    the vertical space is :math:`\operatorname{span}(w)` and the horizontal space, which
    represents the tangent space of the quotient, is :math:`\{u : \langle u, w\rangle = 0\}`.
    Each factor is isometric to the unit sphere :math:`S^{d-1}`. Every operation commutes with
    per-group positive rescaling, e.g. :math:`\operatorname{retr}(c w, c u) = c\,
    \operatorname{retr}(w, u)`, and the retraction keeps the representative's norm, so the
    learning rate of Riemannian SGD is an angle whatever the weight norm.

    Float16 and bfloat16 tensors are computed in float32 internally and returned in their own
    dtype.

    Parameters
    ----------
    dim : int or None
        the group axis (negative values count from the end), or ``None`` for one group made
        of the whole tensor (default: ``0``)

    Examples
    --------
    >>> import geoopt, torch
    >>> w = geoopt.ManifoldParameter(torch.randn(16, 3, 3, 3), manifold=PSIManifold(dim=0))
    >>> opt = geoopt.optim.RiemannianSGD([w], lr=0.1)
    """

    name = "PSI"
    ndim = 1
    reversible = False

    def __init__(self, dim: int | None = 0):
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"PSIManifold: `dim` must be an int or None, got {dim!r}")
        self.dim = dim

    # ------------------------------------------------------------------ groups and checks

    def _group_axis(self, ndim: int) -> int | None:
        """The non-negative group axis for a tensor of rank ``ndim`` (``None``: one group)."""
        if ndim < 1:
            raise ValueError(
                f"{self}: a point must have at least one dimension, got a rank-0 tensor"
            )
        if self.dim is None:
            return None
        if not -ndim <= self.dim < ndim:
            raise ValueError(
                f"{self}: `dim`={self.dim} is out of range for a tensor of rank {ndim} "
                f"(expected -{ndim} <= dim < {ndim})"
            )
        return self.dim % ndim

    def _reduced_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        """The axes summed over to form the groups of ``x``, after checking its dtype."""
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{self}: unsupported dtype {x.dtype}; a PSI point must be float16, bfloat16, "
                "float32 or float64"
            )
        axis = self._group_axis(x.dim())
        return tuple(a for a in range(x.dim()) if a != axis)

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        try:
            self._group_axis(len(shape))
        except ValueError as error:
            return False, f"`{name}`: {error}"
        return True, None

    def _invalid_groups(self, x: torch.Tensor) -> str | None:
        """Describe the zero or non-finite groups of ``x``, or ``None`` if every group is valid."""
        if x.is_meta:
            return None
        axes = self._reduced_axes(x)
        with torch.no_grad():
            peak = x.detach().abs()
            if axes:
                # an empty group (a zero-size axis) is a zero group; amax rejects empty axes
                peak = peak.amax(dim=axes) if peak.numel() else peak.sum(dim=axes)
            problems = []
            for label, bad in (("zero", peak == 0), ("non-finite (NaN or Inf)", ~peak.isfinite())):
                if bool(bad.any()):
                    if self.dim is None:
                        problems.append(f"the whole-tensor group is {label}")
                        continue
                    index = bad.nonzero().flatten().tolist()
                    shown = ", ".join(map(str, index[:_MAX_LISTED_GROUPS]))
                    more = f", ... ({len(index)} in all)" if len(index) > _MAX_LISTED_GROUPS else ""
                    problems.append(f"groups [{shown}{more}] along dim={self.dim} are {label}")
        if not problems:
            return None
        return (
            f"{'; '.join(problems)} in a tensor of shape {tuple(x.shape)}; every group of a PSI "
            "point must be finite and non-zero"
        )

    def assert_check_point(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` unless ``x`` has a valid shape and dtype and valid groups.

        This runs when a :class:`geoopt.ManifoldParameter` is created on this manifold, so a
        zero, NaN or Inf group is rejected at construction.
        """
        super().assert_check_point(x)
        reason = self._invalid_groups(x)
        if reason is not None:
            raise ValueError(f"`x` is not a point of the {self}: {reason}")

    def check_point(self, x: torch.Tensor, *, explain: bool = False):
        ok, reason = self._check_shape(x.shape, "x")
        if ok:
            ok, reason = self._check_point_on_manifold(x)
        return (ok, reason) if explain else ok

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        try:
            reason = self._invalid_groups(x)
        except TypeError as error:
            reason = str(error)
        return reason is None, reason

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        r"""Horizontality in the metric, :math:`|\langle u, \hat w\rangle| / r \le atol + rtol\,
        \|u\|_g` per group, so that the answer does not depend on the representative."""
        try:
            u = self._broadcast_to_point(x, "u", u)
        except ValueError as error:
            return False, str(error)
        x, u = self._upcast(x, u)
        radius = self._norm(x)
        radial = self._dot(x, u).abs() / radius**2
        bad = radial > atol + rtol * self._norm(u) / radius
        if not bool(bad.any()):
            return True, None
        where = (
            "" if self.dim is None else f" in groups {bad.flatten().nonzero().flatten().tolist()}"
        )
        return False, f"`u` is not horizontal (<u, x> != 0){where} with atol={atol}, rtol={rtol}"

    # ------------------------------------------------------------------ reductions

    def _upcast(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Float16/bfloat16 to float32, everything else unchanged."""
        return tuple(t.float() if t.dtype in _LOW_PRECISION else t for t in tensors)

    def _dot(self, u: torch.Tensor, v: torch.Tensor, axes: tuple[int, ...] | None = None):
        r"""Per-group :math:`\langle u, v\rangle`, reduced axes kept as size 1."""
        if axes is None:
            axes = self._reduced_axes(u)
        product = u * v
        return product.sum(dim=axes, keepdim=True) if axes else product

    def _norm(self, u: torch.Tensor, axes: tuple[int, ...] | None = None) -> torch.Tensor:
        r"""Per-group :math:`\|u\|`, reduced axes kept as size 1."""
        if axes is None:
            axes = self._reduced_axes(u)
        return torch.linalg.vector_norm(u, dim=axes, keepdim=True) if axes else u.abs()

    def _broadcast_to_point(self, x: torch.Tensor, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.shape == x.shape:
            return t
        try:
            return t.expand_as(x)
        except RuntimeError:
            raise ValueError(
                f"{self}: `{name}` of shape {tuple(t.shape)} does not broadcast to the point's "
                f"shape {tuple(x.shape)}"
            ) from None

    def _prepare(self, x: torch.Tensor, **vectors: torch.Tensor):
        """Check shapes, broadcast the vectors to ``x`` and upcast; return dtype, axes, tensors."""
        axes = self._reduced_axes(x)
        tensors = [x] + [self._broadcast_to_point(x, n, t) for n, t in vectors.items()]
        return x.dtype, axes, self._upcast(*tensors)

    def _squeeze(self, t: torch.Tensor, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        return t if keepdim or not axes else t.squeeze(axes)

    # ------------------------------------------------------------------ metric

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        r"""Scale-invariant metric, one value per group.

        .. math::

            g_w(u, v) = \frac{\langle u, v\rangle}{\|w\|^2}

        With ``keepdim=True`` the summed axes are kept with size 1, so the result broadcasts
        against ``x``; otherwise it has one entry per group (a scalar for ``dim=None``).
        """
        if v is None:
            v = u
        dtype, axes, (x, u, v) = self._prepare(x, u=u, v=v)
        result = self._dot(u, v, axes) / self._dot(x, x, axes)
        return self._squeeze(result, axes, keepdim).to(dtype)

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""The metric per group, broadcastable to ``x`` (geoopt's convention: ``inner`` with
        ``keepdim=True``).

        :class:`geoopt.optim.RiemannianAdam` accumulates this as its second moment, so on a
        PSI parameter Adam keeps **one** second-moment value per group,
        :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2)\|\operatorname{grad} f\|_g^2`, which is
        invariant under rescaling of the group: the adaptive step is a per-group angular step
        (as in Cho & Lee's Adam on the Grassmann manifold), not a per-coordinate one.
        """
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r""":math:`\|u\|_g = \|u\| / \|w\|`, one value per group."""
        dtype, axes, (x, u) = self._prepare(x, u=u)
        result = self._norm(u, axes) / self._norm(x, axes)
        return self._squeeze(result, axes, keepdim).to(dtype)

    # ------------------------------------------------------------------ projections

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        r"""Every finite representative with non-zero groups is a point: :math:`x \mapsto x`.

        Raises ``ValueError`` naming the zero or non-finite groups otherwise; there is no
        canonical way to repair them.
        """
        self.assert_check_point(x)
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Orthogonal projection onto the horizontal space at :math:`w`.

        .. math::

            \operatorname{proj}_w(u) = u - \langle u, \hat w\rangle \hat w
        """
        dtype, axes, (x, u) = self._prepare(x, u=u)
        return (u - (self._dot(u, x, axes) / self._dot(x, x, axes)) * x).to(dtype)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Riemannian gradient for the metric :math:`g_w`.

        .. math::

            \operatorname{grad} f(w) = \|w\|^2 \operatorname{proj}_w(\nabla f(w))
            = \|w\|^2 \nabla f(w) - \langle \nabla f(w), w\rangle\, w

        Its norm :math:`\|\operatorname{grad} f\|_g = \|w\|\,\|\operatorname{proj}_w \nabla
        f\|` is the norm of the sphere gradient at :math:`\hat w`; for a PSI loss
        (:math:`\nabla f(c w) = \nabla f(w)/c`) it scales as :math:`c` with the point.
        """
        dtype, axes, (x, u) = self._prepare(x, u=u)
        return (self._dot(x, x, axes) * u - self._dot(u, x, axes) * x).to(dtype)

    # ------------------------------------------------------------------ maps

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Projective retraction that keeps the representative's norm.

        .. math::

            \operatorname{retr}_w(u) = \|w\| \frac{w + u}{\|w + u\|}

        For a horizontal step of Riemannian norm :math:`\|u\|_g` the angle travelled is
        :math:`\arctan \|u\|_g`.
        """
        dtype, axes, (x, u) = self._prepare(x, u=u)
        return self._retract(x, u, axes).to(dtype)

    def _retract(self, x: torch.Tensor, u: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        r""":meth:`retr` written as an increment of :math:`w`, rounded once.

        With :math:`r = \|w\|` and :math:`s = \|w + u\|`,

        .. math::

            \operatorname{retr}_w(u) = w + \frac{r}{s} u - \frac{\langle 2w + u, u\rangle}
            {s\,(r + s)}\, w,

        because :math:`r/s - 1 = (r^2 - s^2)/(s(r + s))` and :math:`s^2 - r^2 = \langle 2w + u,
        u\rangle`. Rescaling :math:`w + u` by :math:`r/s` instead would lose the radial
        correction of small steps to rounding (in float32, :math:`r/s` rounds to 1 once
        :math:`\|u\|_g^2 < 10^{-7}`), and the norm would creep up step after step.
        """
        radius = self._norm(x, axes)
        new_radius = self._norm(x + u, axes)
        radial = self._dot(2 * x + u, u, axes) / (new_radius * (radius + new_radius))
        return x + ((radius / new_radius) * u - radial * x)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Exponential map along the great circle, for horizontal :math:`u`.

        .. math::

            \operatorname{Exp}_w(u) = \cos\theta\, w + \frac{\sin\theta}{\theta}\, u,
            \qquad \theta = \|u\|_g = \frac{\|u\|}{\|w\|}

        (written with :math:`\sin\theta/\theta` so that :math:`u = 0` needs no special case).
        """
        dtype, axes, (x, u) = self._prepare(x, u=u)
        theta = self._norm(u, axes) / self._norm(x, axes)
        return (torch.cos(theta) * x + torch.sinc(theta / torch.pi) * u).to(dtype)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Inverse of :meth:`expmap` for rays at angle :math:`\varphi < \pi`.

        .. math::

            \operatorname{Log}_w(y) = \|w\|\, \varphi \frac{p}{\|p\|}, \quad
            p = \hat y - \langle \hat y, \hat w\rangle \hat w, \quad
            \varphi = \operatorname{atan2}(\|p\|, \langle \hat y, \hat w\rangle)

        The result depends on the ray of :math:`y` only. At :math:`\varphi = \pi`
        (antipodal rays) the direction is undefined and zero is returned.
        """
        dtype, axes, (x, y) = self._prepare(x, y=y)
        radius = self._norm(x, axes)
        x_unit = x / radius
        y_unit = y / self._norm(y, axes)
        cosine = self._dot(y_unit, x_unit, axes)
        p = y_unit - cosine * x_unit
        p_norm = self._norm(p, axes)
        angle = torch.atan2(p_norm, cosine)
        ratio = torch.where(
            p_norm > 0, angle / p_norm.clamp_min(torch.finfo(p_norm.dtype).tiny), 1.0
        )
        return (radius * ratio * p).to(dtype)

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r"""Geodesic distance of the quotient: the angle between the rays, in :math:`[0, \pi]`.

        .. math::

            d([w], [y]) = \operatorname{atan2}(\|p\|, \langle \hat y, \hat w\rangle)

        computed with ``atan2`` (accurate for small and large angles alike).
        """
        dtype, axes, (x, y) = self._prepare(x, y=y)
        x_unit = x / self._norm(x, axes)
        y_unit = y / self._norm(y, axes)
        cosine = self._dot(y_unit, x_unit, axes)
        angle = torch.atan2(self._norm(y_unit - cosine * x_unit, axes), cosine)
        return self._squeeze(angle, axes, keepdim).to(dtype)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport by projection, rescaled to the target representative.

        .. math::

            \mathcal{T}_{w \to y}(v) = \frac{\|y\|}{\|w\|}\left(v - \langle v, \hat y\rangle
            \hat y\right)

        The result is horizontal at :math:`y`, and
        :math:`\mathcal{T}_{a w \to b y}(a v) = b\, \mathcal{T}_{w \to y}(v)` for
        :math:`a, b > 0`.
        """
        dtype, axes, (x, y, v) = self._prepare(x, y=y, v=v)
        y_sq = self._dot(y, y, axes)
        factor = torch.sqrt(y_sq) / self._norm(x, axes)
        return (factor * (v - (self._dot(v, y, axes) / y_sq) * y)).to(dtype)

    def retr_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":meth:`retr` and :meth:`transp` of ``v`` to the new point in one pass.

        Since :math:`\|\operatorname{retr}_w(u)\| = \|w\|`, the transport factor is 1 and
        :math:`\mathcal{T}(v) = v - \langle v, y\rangle y / \|w\|^2`.
        """
        dtype, axes, (x, u, v) = self._prepare(x, u=u, v=v)
        y = self._retract(x, u, axes)
        v_new = v - (self._dot(v, y, axes) / self._dot(x, x, axes)) * y
        return y.to(dtype), v_new.to(dtype)

    def transp_follow_retr(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathcal{T}_{w \to \operatorname{retr}_w(u)}(v)`."""
        return self.retr_transp(x, u, v)[1]

    # ------------------------------------------------------------------ sampling

    def random(self, *size, dtype=None, device=None, **kwargs) -> ManifoldTensor:
        r"""A point uniform on the quotient: Gaussian groups scaled to unit norm."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.randn(shape, dtype=dtype, device=device)
        return ManifoldTensor(x / self._norm(x), manifold=self)

    random_uniform = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> ManifoldTensor:
        r"""The "north pole" of every group: its first coordinate is 1, the others 0.

        Deterministic, so ``seed`` is not used.
        """
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.zeros(shape, dtype=dtype, device=device)
        axis = self._group_axis(len(shape))
        x[tuple(slice(None) if a == axis else 0 for a in range(len(shape)))] = 1
        return ManifoldTensor(x, manifold=self)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
