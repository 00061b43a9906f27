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

    **Points and batches.** geoopt reads the trailing ``ndim`` dimensions of a tensor as one
    point and every leading dimension as a batch of independent points (``Sphere``: the last
    dimension). With ``ndim=k`` a tensor of shape :math:`(b_1, \dots, b_m, p_1, \dots, p_k)`
    holds the points :math:`W_b \in \mathbb{R}^{p_1 \times \dots \times p_k}`, one per batch
    index :math:`b`; with ``ndim=None`` (default) the whole tensor is one point, as for the
    weight of a layer (:func:`~psi_geoopt.to_psi`).

    **Groups.** A point :math:`W` is split into groups along its axis ``dim`` exactly as
    :func:`torch.nn.utils.weight_norm` splits a weight: with ``dim=0`` every index of the
    point's first axis (an output channel of a ``Linear``/``Conv`` weight) is one group made
    of all the point's other axes; ``dim=1`` is the output channel of a ``ConvTranspose``
    weight; with ``dim=None`` the whole point is one group. Write :math:`w` for one group
    flattened to a vector, :math:`r = \|w\|` and :math:`\hat w = w / r`. The point :math:`w`
    represents the ray :math:`[w] = \{c\, w : c > 0\}`; a valid point has every group finite
    and non-zero. Every operation acts on each group (of each point of a batch) independently.

    The metric is invariant under the action :math:`w \mapsto c\, w`,

    .. math::

        g_w(u, v) = \frac{\langle u, v \rangle}{r^2},

    the vertical space is :math:`\operatorname{span}(w)` and the horizontal space, which
    represents the tangent space of the quotient, is :math:`\{u : \langle u, w\rangle = 0\}`.
    Each factor is isometric to the unit sphere :math:`S^{d-1}`. Every operation commutes with
    per-group positive rescaling, e.g. :math:`\operatorname{retr}(c w, c u) = c\,
    \operatorname{retr}(w, u)`, and the retraction keeps the representative's norm, so the
    learning rate of Riemannian SGD is an angle whatever the weight norm. On unit rows,
    ``PSIManifold(dim=None, ndim=1)`` takes the steps of :class:`geoopt.Sphere` (to rounding).

    **Broadcasting.** With ``ndim=k`` the batch dimensions of all arguments broadcast as in
    torch (a point of shape :math:`(p_1, \dots, p_k)` with vectors of shape
    :math:`(B, p_1, \dots, p_k)` gives ``B`` answers), the point dimensions must be those of
    ``x``, and stacking points and vectors along new leading axes stacks the answers. With
    ``ndim=None`` the other arguments must broadcast to the shape of ``x``: a vector with more
    dimensions than the point is refused, since nothing says which of its axes are a batch.
    Per-group values (``inner``, ``norm``, ``dist``) have shape ``(*batch, groups)``
    (``(*batch,)`` for ``dim=None``); with ``keepdim=True`` the summed axes are kept with size
    one, so the result broadcasts against ``x``.

    **geoopt's idioms.** :class:`geoopt.ProductManifold` hands its factors batches of points,
    so a factor needs ``ndim=len(shape)``; ``ndim=None`` is refused there. geoopt's
    ``SparseRiemannianSGD``/``SparseRiemannianAdam`` step the rows of axis 0 one by one, which
    is right only if every group lies inside one row (``dim=0`` of the whole tensor, or
    ``ndim`` below the rank); they do not check, :mod:`psi_geoopt.optim.sparse`'s versions
    refuse the other layouts. The retraction is not reversible (``reversible = False``, as for
    ``Sphere``), so geoopt's samplers refuse PSI parameters.

    :meth:`projx` is the identity (any non-zero representative is a point) and reads no
    values, so it never waits for a device; a zero, NaN or Inf group is found by
    :meth:`check_point`, :meth:`assert_check_point` (run when a
    :class:`geoopt.ManifoldParameter` is created) and the ``stabilize`` option of
    :mod:`psi_geoopt.optim`'s optimizers. geoopt's own ``stabilize`` only calls :meth:`projx`
    and does not check.

    Float16 and bfloat16 tensors are computed in float32 internally and returned in their own
    dtype.

    Parameters
    ----------
    dim : int or None
        the group axis: an axis of the whole tensor with ``ndim=None`` (negative values count
        from the end), an axis of the point with ``ndim=k`` (``-k <= dim < k``); ``None`` for
        one group made of the whole point (default: ``0``)
    ndim : int or None
        the number of trailing dimensions that make one point, leading dimensions being a
        batch (geoopt's convention); ``None`` for a point made of the whole tensor
        (default: ``None``)

    Examples
    --------
    >>> import geoopt, torch
    >>> w = geoopt.ManifoldParameter(torch.randn(16, 3, 3, 3), manifold=PSIManifold(dim=0))
    >>> opt = geoopt.optim.RiemannianSGD([w], lr=0.1)

    Five rows, each on the sphere, next to a Euclidean scalar each:

    >>> rows = PSIManifold(dim=None, ndim=1)
    >>> product = geoopt.ProductManifold((rows, 10), (geoopt.Euclidean(), ()))
    >>> x = product.random(5, 11)
    """

    name = "PSI"
    reversible = False

    def __init__(self, dim: int | None = 0, ndim: int | None = None):
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"PSIManifold: `dim` must be an int or None, got {dim!r}")
        if ndim is not None:
            if isinstance(ndim, bool) or not isinstance(ndim, int):
                raise TypeError(f"PSIManifold: `ndim` must be an int or None, got {ndim!r}")
            if ndim < 1:
                raise ValueError(
                    f"PSIManifold: `ndim`={ndim}, but a point has at least one dimension "
                    "(ndim >= 1)"
                )
            if dim is not None and not -ndim <= dim < ndim:
                raise ValueError(
                    f"PSIManifold: `dim`={dim} is out of range for points of `ndim`={ndim} "
                    f"(expected -{ndim} <= dim < {ndim}, or None)"
                )
        self.dim = dim
        self.ndim = ndim

    # ------------------------------------------------------------------ layout and checks

    def _point_rank(self, rank: int) -> int:
        """The number of trailing axes of a rank-``rank`` tensor that make one point."""
        if self.ndim is not None:
            if rank < self.ndim:
                raise ValueError(
                    f"{self}: a point has `ndim`={self.ndim} dimensions, got a tensor of rank "
                    f"{rank}"
                )
            return self.ndim
        if rank < 1:
            raise ValueError(
                f"{self}: a point must have at least one dimension, got a rank-0 tensor"
            )
        if self.dim is not None and not -rank <= self.dim < rank:
            raise ValueError(
                f"{self}: `dim`={self.dim} is out of range for a tensor of rank {rank} "
                f"(expected -{rank} <= dim < {rank})"
            )
        return rank

    def _group_axis(self, rank: int) -> int | None:
        """The group axis of a rank-``rank`` tensor counted from the end (``None``: one group
        per point)."""
        point_rank = self._point_rank(rank)
        return None if self.dim is None else self.dim % point_rank - point_rank

    def _reduced_axes(self, rank: int) -> tuple[int, ...]:
        """The axes summed over to form the groups, counted from the end, so that the same
        axes serve a point and a stack of points."""
        point_rank = self._point_rank(rank)
        if self.dim is None:
            return tuple(range(-point_rank, 0))
        axis = self.dim % point_rank - point_rank
        return tuple(a for a in range(-point_rank, 0) if a != axis)

    def _check_dtype(self, x: torch.Tensor) -> None:
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{self}: unsupported dtype {x.dtype}; a PSI point must be float16, bfloat16, "
                "float32 or float64"
            )

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        if self.ndim is None and name.endswith("'th shape"):
            # geoopt.ProductManifold checks each factor's shape under this name; it hands
            # the factor tensors of shape (*batch, *shape), which ndim=None would read as
            # one point, batch included.
            return False, (
                f"{self} reads a whole tensor as one point, but ProductManifold passes its "
                f"factors batches of points of shape {tuple(shape)}: use "
                f"PSIManifold(dim={self.dim}, ndim={len(shape)})"
            )
        try:
            self._point_rank(len(shape))
        except ValueError as error:
            return False, f"`{name}`: {error}"
        return True, None

    def _describe_groups(self, mask: torch.Tensor) -> str:
        """Name the groups where ``mask`` (one entry per group, reduced axes squeezed) holds."""
        if mask.dim() == 0:
            return "the whole-tensor group" if self.ndim is None else "the group of the point"
        axes = [f"batch axis {a}" for a in range(mask.dim() - (self.dim is not None))]
        axes += [] if self.dim is None else [f"dim={self.dim}"]
        index = mask.nonzero()
        listed = [
            str(i[0]) if len(i) == 1 else str(tuple(i)) for i in index[:_MAX_LISTED_GROUPS].tolist()
        ]
        more = f", ... ({len(index)} in all)" if len(index) > _MAX_LISTED_GROUPS else ""
        where = axes[0] if len(axes) == 1 else f"({', '.join(axes)})"
        return f"groups [{', '.join(listed)}{more}] along {where}"

    def _invalid_groups(self, x: torch.Tensor) -> str | None:
        """Describe the zero or non-finite groups of ``x``, or ``None`` if every group is valid."""
        if x.is_meta:
            return None
        self._check_dtype(x)
        axes = self._reduced_axes(x.dim())
        with torch.no_grad():
            peak = x.detach().abs()
            if axes:
                # an empty group (a zero-size axis) is a zero group; amax rejects empty axes
                peak = peak.amax(dim=axes) if peak.numel() else peak.sum(dim=axes)
            problems = [
                f"{self._describe_groups(bad)} {'is' if bad.dim() == 0 else 'are'} {label}"
                for label, bad in (
                    ("zero", peak == 0),
                    ("non-finite (NaN or Inf)", ~peak.isfinite()),
                )
                if bool(bad.any())
            ]
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
            _, axes, (x, u) = self._prepare(x, u=u)
        except ValueError as error:
            return False, str(error)
        radius = self._norm(x, axes)
        radial = self._dot(x, u, axes).abs() / radius**2
        bad = radial > atol + rtol * self._norm(u, axes) / radius
        if not bool(bad.any()):
            return True, None
        where = self._describe_groups(self._squeeze(bad, axes, keepdim=False))
        return (
            False,
            f"`u` is not horizontal (<u, x> != 0) in {where} with atol={atol}, rtol={rtol}",
        )

    # ------------------------------------------------------------------ reductions

    def _upcast(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Float16/bfloat16 to float32, everything else unchanged."""
        return tuple(t.float() if t.dtype in _LOW_PRECISION else t for t in tensors)

    @staticmethod
    def _dot(u: torch.Tensor, v: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        r"""Per-group :math:`\langle u, v\rangle`, reduced axes kept as size 1."""
        product = u * v
        return product.sum(dim=axes, keepdim=True) if axes else product

    @staticmethod
    def _norm(u: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        r"""Per-group :math:`\|u\|`, reduced axes kept as size 1."""
        return torch.linalg.vector_norm(u, dim=axes, keepdim=True) if axes else u.abs()

    def _broadcast_shape(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Size:
        """The shape every argument is expanded to, or a ``ValueError`` naming the first
        argument that does not fit: the shape of ``x`` with ``ndim=None``, the broadcast batch
        shape followed by ``x``'s point shape with ``ndim=k``."""
        shape = x.shape
        for name, t in tensors.items():
            if t.shape == shape:
                continue
            try:
                joint = torch.broadcast_shapes(shape, t.shape)
            except RuntimeError:
                joint = None
            point_rank = self._point_rank(x.dim())
            if self.ndim is None:
                fits, expected = joint == x.shape, f"to the point's shape {tuple(x.shape)}"
            else:
                point_shape = x.shape[x.dim() - point_rank :]
                fits = joint is not None and joint[len(joint) - point_rank :] == point_shape
                expected = (
                    f"against the point's shape {tuple(x.shape)} (batch dimensions broadcast, "
                    f"the point's {tuple(point_shape)} stays)"
                )
            if not fits:
                raise ValueError(
                    f"{self}: `{name}` of shape {tuple(t.shape)} does not broadcast {expected}"
                )
            shape = joint
        return shape

    def _prepare(self, x: torch.Tensor, **vectors: torch.Tensor):
        """Check dtype and shapes, expand every argument to the common shape (views) and
        upcast; return ``x``'s dtype, the reduced axes and the tensors."""
        self._check_dtype(x)
        axes = self._reduced_axes(x.dim())
        shape = self._broadcast_shape(x, vectors)
        tensors = [t if t.shape == shape else t.expand(shape) for t in (x, *vectors.values())]
        return x.dtype, axes, self._upcast(*tensors)

    @staticmethod
    def _squeeze(t: torch.Tensor, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
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
        against ``x``; otherwise it has shape ``(*batch, groups)``, one entry per group
        (``(*batch,)`` for ``dim=None``; a scalar for one point with ``dim=None``).
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

        Only the shape and dtype are checked: reading the values would wait for the device on
        every call (geoopt's ``RiemannianAdam`` calls ``projx`` at every step). A zero or
        non-finite group cannot be repaired; :meth:`check_point` and
        :meth:`assert_check_point` find it.
        """
        self._check_dtype(x)
        self._point_rank(x.dim())
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
        r""":meth:`retr` as a correction of :math:`w + u`, its radial factor formed from its
        difference to 1.

        With :math:`r = \|w\|` and :math:`s = \|w + u\|`,

        .. math::

            \operatorname{retr}_w(u) = (w + u) - \rho\, (w + u), \qquad
            \rho = 1 - \frac{r}{s} = \frac{\langle 2w + u, u\rangle}{s\,(r + s)},

        because :math:`s^2 - r^2 = \langle 2w + u, u\rangle`. Rescaling :math:`w + u` by
        :math:`r/s` would lose the radial correction of small steps to rounding (in float32,
        :math:`r/s` rounds to 1 once :math:`\|u\|_g^2 < 10^{-7}`), and the norm would creep up
        step after step; the correction :math:`\rho` keeps it. A step that is not horizontal
        can bring :math:`w + u` close to the origin (:math:`s \ll r`): then :math:`-\rho = r/s
        - 1` is large and of the sign of 1, nothing cancels, and the norm is still kept to
        rounding (adding :math:`r/s\, u - \rho\, w` to :math:`w` instead would be off by
        :math:`r/s` roundings).
        """
        radius = self._norm(x, axes)
        moved = x + u
        new_radius = self._norm(moved, axes)
        radial = self._dot(2 * x + u, u, axes) / (new_radius * (radius + new_radius))
        return moved - radial * moved

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
        r"""Points uniform on the quotient: Gaussian groups scaled to unit norm (``size`` may
        lead with batch dimensions when ``ndim`` is set)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.randn(shape, dtype=dtype, device=device)
        return ManifoldTensor(x / self._norm(x, self._reduced_axes(len(shape))), manifold=self)

    random_uniform = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> ManifoldTensor:
        r"""The "north pole" of every group: its first coordinate is 1, the others 0.

        Deterministic, so ``seed`` is not used.
        """
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.zeros(shape, dtype=dtype, device=device)
        point_rank, axis = self._point_rank(len(shape)), self._group_axis(len(shape))
        batch = (slice(None),) * (len(shape) - point_rank)
        x[batch + tuple(slice(None) if a == axis else 0 for a in range(-point_rank, 0))] = 1
        return ManifoldTensor(x, manifold=self)

    # ------------------------------------------------------------------ configuration

    def extra_repr(self) -> str:
        return f"dim={self.dim}" if self.ndim is None else f"dim={self.dim}, ndim={self.ndim}"

    def get_extra_state(self) -> dict[str, int | None]:
        """``dim`` and ``ndim`` in the ``state_dict`` of a module holding this manifold."""
        return {"dim": self.dim, "ndim": self.ndim}

    def set_extra_state(self, state: dict[str, int | None]) -> None:
        """Refuse a ``state_dict`` saved from a manifold with other groups: its values would be
        read with the wrong geometry."""
        saved = PSIManifold(state.get("dim"), state.get("ndim"))
        if (saved.dim, saved.ndim) != (self.dim, self.ndim):
            raise ValueError(f"the state_dict was saved from {saved}, but this module holds {self}")
