r"""Drop-in Riemannian optimizers whose iterates are equivariant from the first step.

geoopt's :class:`geoopt.optim.RiemannianSGD` starts its momentum buffer from the raw Euclidean
gradient, before weight decay and before :meth:`~geoopt.Manifold.egrad2rgrad`. On a PSI
parameter that buffer is not horizontal and scales as :math:`1/c` when the point is rescaled by
:math:`c`, while every later term scales as :math:`c`: equivalent starting points then follow
non-equivalent trajectories. :class:`RiemannianSGD` below is geoopt's optimizer with that one
line changed (the buffer starts from the Riemannian gradient, as :class:`torch.optim.SGD`'s
starts from the gradient), and it no longer writes weight decay into ``p.grad``.

Two implementations of the same step live side by side, as in :mod:`torch.optim.sgd`:
:func:`_single_tensor_rsgd`, the reference loop calling the manifold's operations parameter by
parameter, and :func:`_multi_tensor_rsgd`, the fast path (``foreach`` ops for the Euclidean
parameters, one fused pass per PSI parameter derived in :func:`_psi_momentum_step`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import geoopt
import torch
from geoopt import ManifoldParameter, ManifoldTensor

from .manifold import PSIManifold

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

__all__ = ["RiemannianSGD"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RiemannianSGD(geoopt.optim.RiemannianSGD):
    r"""Riemannian SGD with momentum, Nesterov and weight decay, equivariant on PSI parameters.

    Same constructor, hyper-parameters and state format as
    :class:`geoopt.optim.RiemannianSGD`. For a parameter :math:`x` on manifold
    :math:`\mathcal{M}` and step :math:`t`:

    .. math::

        \begin{aligned}
            g_t &= \operatorname{egrad2rgrad}_{x_t}(\nabla f(x_t) + \lambda x_t) \\
            b_t &= \begin{cases} g_t & t = 1 \\
                   \mu\, \mathcal{T}_{x_{t-1} \to x_t}(b_{t-1}) + (1 - \tau) g_t & t > 1
                   \end{cases} \\
            d_t &= g_t + \mu b_t \ \text{(Nesterov)} \quad\text{or}\quad d_t = b_t \\
            x_{t+1}, \mathcal{T}(b_t) &= \operatorname{retr\_transp}_{x_t}(-\eta\, d_t, b_t)
        \end{aligned}

    with learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight
    decay :math:`\lambda`. Without momentum :math:`x_{t+1} = \operatorname{retr}_{x_t}(-\eta
    g_t)`. On a PSI parameter the weight-decay term is radial and removed by the projection.

    Parameters
    ----------
    foreach : bool or None
        ``None`` (default) or ``True``: the fast path — ``torch._foreach_*`` operations over
        the plain (Euclidean) parameters of a group, as :class:`torch.optim.SGD` with
        ``foreach=True``, and one fused pass per contiguous :class:`~psi_geoopt.PSIManifold`
        parameter grouped along its first axis (``dim=0``, or ``dim=None``); every other
        parameter (other manifolds, other group axes, non-contiguous tensors) goes through
        the reference loop. ``False``: the reference loop for every parameter. Both compute
        the same step up to rounding.
    compile : bool
        run the fused PSI pass through :func:`torch.compile` (one dynamic-shape graph; the
        first step compiles it, which takes tens of seconds on a CPU). Falls back to eager,
        with a warning, where compilation fails. Default ``False``.
    """

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        stabilize=None,
        *,
        foreach: bool | None = None,
        compile: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            stabilize=stabilize,
        )
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"RiemannianSGD: `foreach` must be a bool or None, got {foreach!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"RiemannianSGD: `compile` must be a bool, got {compile!r}")
        self.foreach = foreach
        self.compile = compile

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", None)
        self.__dict__.setdefault("compile", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            hyper = dict(
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                lr=group["lr"],
            )
            params = [p for p in group["params"] if p.grad is not None]
            for point in params:
                if point.grad.is_sparse:
                    raise RuntimeError(
                        "RiemannianSGD does not support sparse gradients, use "
                        "SparseRiemannianSGD instead"
                    )
            if self.foreach is False:
                _single_tensor_rsgd(params, self.state, self._default_manifold, **hyper)
            else:
                _multi_tensor_rsgd(
                    params, self.state, self._default_manifold, compile=self.compile, **hyper
                )
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss


def _manifold_of(point: torch.Tensor, default: geoopt.Manifold) -> geoopt.Manifold:
    """The manifold of a :class:`geoopt.ManifoldParameter`; for any other tensor its attribute
    ``manifold`` if it has one (a parameter re-created by a wrapper such as FSDP2's
    ``fully_shard``, which keeps a tensor's value but not its class), else ``default``."""
    if isinstance(point, (ManifoldParameter, ManifoldTensor)):
        return point.manifold
    manifold = getattr(point, "manifold", None)
    return manifold if isinstance(manifold, geoopt.Manifold) else default


def _single_tensor_rsgd(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
) -> None:
    """The reference step: the manifold's operations, one parameter at a time."""
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        grad = point.grad
        if weight_decay != 0:
            grad = grad.add(point, alpha=weight_decay)
        rgrad = manifold.egrad2rgrad(point, grad)
        if momentum == 0:
            point.copy_(manifold.retr(point, -lr * rgrad))
            continue
        param_state = state[point]
        buffer = param_state.get("momentum_buffer")
        if buffer is None:
            buffer = param_state["momentum_buffer"] = rgrad.clone()
        else:
            buffer.mul_(momentum).add_(rgrad, alpha=1 - dampening)
        direction = rgrad.add(buffer, alpha=momentum) if nesterov else buffer
        new_point, new_buffer = manifold.retr_transp(point, -lr * direction, buffer)
        buffer.copy_(new_buffer)
        point.copy_(new_point)


def _fused_group_size(point: torch.Tensor, manifold: geoopt.Manifold) -> int | None:
    """The group size if ``point`` can take the fused PSI pass, else ``None``.

    The pass works on the groups as the rows of a ``(groups, group_size)`` view: a contiguous
    tensor in a floating dtype grouped along axis 0, or as a whole (``dim=None``). A
    :class:`~torch.distributed.tensor.DTensor` qualifies when it is grouped along axis 0 and
    every placement is ``Shard(0)`` or ``Replicate()`` (FSDP2's ``fully_shard``): each group
    then lives whole on one rank and the pass runs on the local rows, without communication.
    """
    if type(manifold) is not PSIManifold or point.dim() == 0 or point.numel() == 0:
        return None
    if point.dtype not in _FUSED_DTYPES:
        return None
    sharded = _is_dtensor(point)
    if sharded and not all(
        placement.is_replicate() or placement.is_shard(0) for placement in point.placements
    ):
        return None
    if not _local(point).is_contiguous():
        return None
    if manifold.dim is None:
        return None if sharded else point.numel()
    if manifold.dim % point.dim() != 0:
        return None
    return point.numel() // point.shape[0]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its memory), any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _rows(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    return _local(tensor).reshape(-1, group_size)


def _multi_tensor_rsgd(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
    compile: bool = False,
) -> None:
    """The fast step: the same update as :func:`_single_tensor_rsgd`.

    Euclidean parameters take ``torch._foreach_*`` operations (as ``torch.optim.SGD`` with
    ``foreach=True``, without writing into ``p.grad``), parameters on
    :class:`~psi_geoopt.PSIManifold` grouped along axis 0 one fused pass each
    (:func:`_psi_momentum_step`), every other parameter the reference loop.
    """
    euclidean, psi, other = [], [], []
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        if type(manifold) is geoopt.Euclidean:
            euclidean.append(point)
        elif (group_size := _fused_group_size(point, manifold)) is not None:
            psi.append((point, group_size))
        else:
            other.append(point)
    hyper = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening, lr=lr)
    if other:
        _single_tensor_rsgd(other, state, default_manifold, nesterov=nesterov, **hyper)
    if euclidean:
        _foreach_euclidean_sgd(euclidean, state, nesterov=nesterov, **hyper)
    step = _compiled_psi_step() if compile else _psi_momentum_step
    for point, group_size in psi:
        buffer = state[point].get("momentum_buffer") if momentum != 0 else None
        first = momentum != 0 and buffer is None
        if first:
            buffer = state[point]["momentum_buffer"] = torch.zeros_like(point)
        elif buffer is not None and not _local(buffer).is_contiguous():
            _single_tensor_rsgd([point], state, default_manifold, nesterov=nesterov, **hyper)
            continue
        x = _rows(point.data, group_size)
        if x.shape[0] == 0:  # a rank that holds no group of this parameter
            continue
        _fused_psi_update(
            step,
            x,
            _rows(point.grad, group_size),
            None if buffer is None else _rows(buffer, group_size),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            first=first,
        )


def _foreach_euclidean_sgd(
    params: list[torch.Tensor],
    state: dict,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
) -> None:
    """``torch.optim.SGD``'s multi-tensor step, leaving ``p.grad`` untouched."""
    grads = [p.grad for p in params]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        running, running_grads = [], []
        for point, grad in zip(params, grads, strict=True):
            param_state = state[point]
            if param_state.get("momentum_buffer") is None:
                param_state["momentum_buffer"] = grad.clone()
            else:
                running.append(param_state["momentum_buffer"])
                running_grads.append(grad)
        if running:
            torch._foreach_mul_(running, momentum)
            torch._foreach_add_(running, running_grads, alpha=1 - dampening)
        buffers = [state[p]["momentum_buffer"] for p in params]
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    torch._foreach_add_(params, grads, alpha=-lr)


def _fused_psi_update(
    step: Callable[..., None],
    x: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    **hyper,
) -> None:
    """Run ``step`` on ``(groups, group_size)`` views, in float32 for float16/bfloat16."""
    if x.dtype not in _LOW_PRECISION:
        step(x, grad, buffer, **hyper)
        return
    x32, buffer32 = x.float(), None if buffer is None else buffer.float()
    step(x32, grad.float(), buffer32, **hyper)
    x.copy_(x32)
    if buffer is not None:
        buffer.copy_(buffer32)


def _psi_momentum_step(
    x: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
) -> None:
    r"""One PSI step on ``(groups, group_size)`` views, updating ``x`` and ``buffer`` in place.

    Per group, with :math:`u = \nabla f(x)` (weight decay is radial and drops out) and
    :math:`b` the transported buffer of the previous step, the reference step computes
    :math:`g = \|x\|^2 u - \langle u, x\rangle x`, :math:`b' = \mu b + (1 - \tau) g`
    (:math:`b' = g` at the first step), :math:`d = b'` or :math:`g + \mu b'`,
    :math:`y = x - \eta d`, :math:`x_+ = \|x\|\, y / \|y\|` and
    :math:`b_+ = b' - \langle b', x_+\rangle x_+ / \|x\|^2`. Three facts of the geometry
    remove every norm of an intermediate vector:

    * :math:`b` is horizontal at :math:`x` (the previous transport made it so), and so are
      :math:`g`, :math:`b'` and :math:`d`: :math:`\langle b, x\rangle = \langle d, x\rangle = 0`;
    * hence :math:`\|y\|^2 = \|x\|^2 + \eta^2 \|d\|^2` and
      :math:`\langle b', y\rangle = -\eta \langle b', d\rangle`;
    * :math:`\|g\|^2 = \|x\|^2 (\|x\|^2 \|u\|^2 - \langle u, x\rangle^2)` and
      :math:`\langle b, g\rangle = \|x\|^2 \langle b, u\rangle`.

    So five per-group sums over the three inputs, in **one read pass**,

    .. math::

        s_{xx} = \|x\|^2,\ s_{xu} = \langle x, u\rangle,\ s_{uu} = \|u\|^2,\
        s_{bu} = \langle b, u\rangle,\ s_{bb} = \|b\|^2

    give :math:`\|b'\|^2`, :math:`\langle b', g\rangle`, :math:`\|d\|^2`,
    :math:`\langle b', d\rangle` by bilinearity, then
    :math:`\|y\|^2 = s_{xx} + \eta^2 \|d\|^2` and the outputs are per-group linear
    combinations of the inputs, **one read-write pass**:

    .. math::

        x_+ = \sqrt{s_{xx} / \|y\|^2}\; y, \qquad
        b_+ = b' + \kappa\, y, \quad \kappa = \eta \langle b', d\rangle / \|y\|^2 .

    Without Nesterov (:math:`d = b'`), :math:`y = (\|y\|^2 / s_{xx})(x - \eta b_+)`, so
    :math:`x_+ = \sqrt{\|y\|^2 / s_{xx}}\,(x - \eta b_+)` is computed from the new buffer in
    place. Memory traffic per element: read :math:`x, u, b` twice, write :math:`x, b` once —
    8 tensor passes, as many as the three in-place ``foreach`` operations of
    :class:`torch.optim.SGD` with momentum (when the pass is fused by :func:`torch.compile`;
    eager PyTorch adds a temporary per dot product and per in-place term). Without momentum
    (``buffer`` is ``None``): :math:`s_{xx}, s_{xu}, s_{uu}`, then
    :math:`x_+ = \sqrt{s_{xx}/(s_{xx} + \eta^2\|g\|^2)}\,(x - \eta g)`.
    """
    xx = _sum_of_squares(x)
    xu = torch.linalg.vecdot(x, grad, dim=1).unsqueeze(1)
    uu = _sum_of_squares(grad)
    gg = (xx * (xx * uu - xu * xu)).clamp_min(0)
    if buffer is None:
        yy = xx + lr * lr * gg
        scale = (xx / yy).sqrt()
        x.mul_(scale * (1 + lr * xu)).addcmul_(grad, scale * (-lr) * xx)
        return
    if first:
        # b' = g
        b_coeff, u_coeff, x_coeff = 0.0, xx, -xu
        bb_new, bg_new = gg, gg
    else:
        bg = xx * torch.linalg.vecdot(buffer, grad, dim=1).unsqueeze(1)
        bb = _sum_of_squares(buffer)
        keep = 1 - dampening
        b_coeff, u_coeff, x_coeff = momentum, keep * xx, -keep * xu
        bb_new = momentum * momentum * bb + 2 * momentum * keep * bg + keep * keep * gg
        bg_new = momentum * bg + keep * gg
    if nesterov:
        dd = gg + 2 * momentum * bg_new + momentum * momentum * bb_new
        bd = bg_new + momentum * bb_new
    else:
        dd = bd = bb_new
    yy = xx + lr * lr * dd
    kappa = lr * bd / yy
    if not nesterov:
        # b_+ = (1 - kappa lr) b' + kappa x ; x_+ = sqrt(yy / xx) (x - lr b_+)
        shrink = 1 - kappa * lr
        if not first:
            buffer.mul_(b_coeff * shrink)
        buffer.addcmul_(grad, u_coeff * shrink).addcmul_(x, x_coeff * shrink + kappa)
        x.sub_(buffer, alpha=lr).mul_((yy / xx).sqrt())
        return
    # d = g + mu b' = (xx + mu u_coeff) u + (-xu + mu x_coeff) x + mu b_coeff b
    y = x.mul(1 - lr * (-xu + momentum * x_coeff)).addcmul_(grad, -lr * (xx + momentum * u_coeff))
    if not first:
        y.add_(buffer, alpha=-lr * momentum * b_coeff)
        buffer.mul_(b_coeff)
    buffer.addcmul_(grad, u_coeff).addcmul_(x, x_coeff).addcmul_(y, kappa)
    torch.mul(y, (xx / yy).sqrt(), out=x)


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Per-row :math:`\\|t_i\\|^2` of a matrix, shape ``(rows, 1)``."""
    return torch.linalg.vector_norm(t, dim=1, keepdim=True).square()


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_psi_step() -> Callable[..., None]:
    """:func:`_psi_momentum_step` through :func:`torch.compile`, falling back to eager."""
    if "step" not in _COMPILED:
        compiled = torch.compile(_psi_momentum_step, dynamic=True)

        def step(*args, **kwargs) -> None:
            if _COMPILED.get("failed"):
                return _psi_momentum_step(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # a missing compiler or an unsupported backend
                warnings.warn(
                    f"RiemannianSGD(compile=True): torch.compile failed ({error!r:.200}); "
                    "using the eager fused step",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _COMPILED["failed"] = step
                return _psi_momentum_step(*args, **kwargs)

        _COMPILED["step"] = step
    return _COMPILED["step"]
