r"""Drop-in Riemannian optimizers whose iterates are equivariant from the first step.

geoopt's :class:`geoopt.optim.RiemannianSGD` starts its momentum buffer from the raw Euclidean
gradient, before weight decay and before :meth:`~geoopt.Manifold.egrad2rgrad`. On a PSI
parameter that buffer is not horizontal and scales as :math:`1/c` when the point is rescaled by
:math:`c`, while every later term scales as :math:`c`: equivalent starting points then follow
non-equivalent trajectories. :class:`RiemannianSGD` below is geoopt's optimizer with that one
line changed (the buffer starts from the Riemannian gradient, as :class:`torch.optim.SGD`'s
starts from the gradient), and it no longer writes weight decay into ``p.grad``.

:class:`RiemannianAdam` is geoopt's :class:`geoopt.optim.RiemannianAdam` with one fix for
checkpoints: :meth:`torch.optim.Adam.__setstate__`, which ``load_state_dict`` calls, turns
geoopt's integer ``state["step"]`` into a float32 tensor, and the bias corrections
:math:`1 - \beta^t` computed from it differ in the last bits from those of the uninterrupted
run. Here the step stays an integer, so a resumed run is bit-identical. It also has a fast
path for PSI parameters (:func:`_psi_adam`), built on the same closed forms, and one with
``foreach`` operations for Euclidean parameters.

Two implementations of the same SGD step live side by side, as in :mod:`torch.optim.sgd`:
:func:`_single_tensor_rsgd`, the reference loop calling the manifold's operations parameter by
parameter, and :func:`_multi_tensor_rsgd`, the fast path (``foreach`` ops for the Euclidean
parameters; for PSI parameters closed forms derived in :func:`_psi_coefficients`: five
per-group sums and one update per tensor, run eagerly or compiled: on CPU one call per tensor
of the Numba loop of :mod:`psi_geoopt.numba_step`, or :func:`torch.compile` into one read
pass and one read-write pass; on CUDA one launch of the Triton kernel of
:mod:`psi_geoopt.triton_step` for all PSI tensors of a group).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from types import ModuleType

import geoopt
import numpy
import torch
from torch.autograd.graph import increment_version

from ..manifold import PSIManifold

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

__all__ = ["RiemannianAdam", "RiemannianSGD"]

AUTO_COMPILE_NUMEL = 2**20
"""Size (elements of fused PSI parameters in one group) from which ``compile=None`` runs the
PSI step through :func:`torch.compile` where no kernel of its own takes it (on CPU without
Numba, on devices other than CUDA)."""

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
        ``foreach=True``, and closed-form updates (two memory passes, the per-group scalar
        algebra batched across tensors) for contiguous :class:`~psi_geoopt.PSIManifold`
        parameters grouped along their first axis (``dim=0``, or ``dim=None``); every other
        parameter (other manifolds, other group axes, non-contiguous tensors) goes through
        the reference loop. ``False``: the reference loop for every parameter. Both compute
        the same step up to rounding. A parameter that is not a
        :class:`geoopt.ManifoldParameter` but has an attribute ``manifold`` is treated as a
        point of that manifold: FSDP2's ``fully_shard`` replaces parameters by plain
        ``DTensor`` parameters, and setting ``p.manifold`` again afterwards keeps them on PSI;
        sharded along axis 0, each group lives on one rank and the fast path updates the
        local rows without communication.
    compile : bool or None
        run the fused PSI step as compiled code rather than eager operations. ``None``
        (default):

        * on CUDA (with Triton, which PyTorch's CUDA builds on Linux bring): one launch of
          the multi-tensor kernel of :mod:`psi_geoopt.triton_step` per parameter group, for
          groups of at most ``MAX_ROW`` elements;
        * on CPU (where Numba, a dependency, can be imported): one call per tensor of the
          compiled loop of :mod:`psi_geoopt.numba_step` (compiled at the first step and
          cached on disk), the fastest CPU path at every size measured, from the demo
          ConvNet to ResNet-50 (``benchmarks/RESULTS.md``);
        * elsewhere, for the groups whose fused PSI parameters hold at least
          :data:`AUTO_COMPILE_NUMEL` elements together: :func:`torch.compile`, one graph per
          parameter group, specialised to its shapes, in which the per-group sums and the
          update of every tensor are fused (and, where inductor supports it, independent
          tensors share kernels); compilation happens at the second step and takes tens of
          seconds; where it fails, the step runs eagerly, with a warning. Smaller groups run
          eagerly.

        ``True``: the Triton kernel on CUDA, :func:`torch.compile` elsewhere, for every
        size. ``False``: never, eager operations everywhere.
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
        compile: bool | None = None,
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
        if compile is not None and not isinstance(compile, bool):
            raise TypeError(f"RiemannianSGD: `compile` must be a bool or None, got {compile!r}")
        self.foreach = foreach
        self.compile = compile

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", None)
        self.__dict__.setdefault("compile", None)

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
            params = []
            for point in group["params"]:
                grad = point.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        "RiemannianSGD does not support sparse gradients, use "
                        "SparseRiemannianSGD instead"
                    )
                params.append(point)
            if self.foreach is False:
                _single_tensor_rsgd(params, self.state, self._default_manifold, **hyper)
            else:
                _multi_tensor_rsgd(
                    params, self.state, self._default_manifold, compile=self.compile, **hyper
                )
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    r"""geoopt's Riemannian Adam whose checkpoints resume bit-exactly.

    Same constructor, hyper-parameters, step and state format as
    :class:`geoopt.optim.RiemannianAdam` (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``amsgrad``, ``stabilize``). On a :class:`~psi_geoopt.PSIManifold` parameter the second
    moment is accumulated from :meth:`~psi_geoopt.PSIManifold.component_inner`, one value per
    group:

    .. math::

        \begin{aligned}
            g_t &= \operatorname{egrad2rgrad}_{x_t}(\nabla f(x_t) + \lambda x_t), \qquad
            m_t = \beta_1 \mathcal{T}(m_{t-1}) + (1 - \beta_1) g_t, \\
            v_t &= \beta_2 v_{t-1} + (1 - \beta_2) \|g_t\|_g^2, \qquad
            x_{t+1} = \operatorname{retr}_{x_t}\Big(-\eta\,
            \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}\Big),
        \end{aligned}

    with :math:`\|g_t\|_g^2` broadcast over the group. :math:`v_t` is invariant under a
    rescaling of the group and :math:`m_t` scales with it, so the step of a group is an angle
    that does not depend on the group's scale (:math:`\epsilon` included), and equivalent
    starting points follow equivalent trajectories.

    Two changes. ``load_state_dict`` keeps ``state["step"]`` an ``int``
    (:meth:`torch.optim.Adam.__setstate__` would make it a float32 tensor). And a fast path,
    for contiguous :class:`~psi_geoopt.PSIManifold` parameters grouped along axis 0 and for
    Euclidean parameters (the group option ``foreach``, as in :class:`torch.optim.Adam`:
    ``None`` or ``True`` takes it, ``False`` runs geoopt's per-parameter loop for every
    parameter). PSI parameters: the same closed forms as :class:`RiemannianSGD`'s with
    momentum :math:`\beta_1`, dampening :math:`\beta_1` and one learning rate per group,
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon))`, from five
    per-group sums, the per-group algebra batched across tensors (on CUDA one launch of the
    Triton kernel of :mod:`psi_geoopt.triton_step`, on CPU with Numba installed one call per
    tensor of the compiled loop of :mod:`psi_geoopt.numba_step`). Euclidean parameters: geoopt's
    operations as ``torch._foreach_*`` operations. The state keeps geoopt's format
    (``exp_avg_sq`` holds :math:`v_t` broadcast over each group). Other parameters go
    through geoopt's loop, which also adds the weight decay into their ``p.grad``; the fast
    path leaves ``p.grad`` untouched.
    """

    def __setstate__(self, state):
        super().__setstate__(state)
        for param_state in self.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                param_state["step"] = int(step.item())

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            fused = [self._fused_parameters(group) for group in self.param_groups]
            groups = self.param_groups
            self.param_groups = [
                {**group, "params": [p for p in group["params"] if id(p) not in taken]}
                for group, taken in zip(groups, ({id(p) for p, _ in f} for f in fused), strict=True)
            ]
            try:  # geoopt's loop for the other parameters, without the step hooks (run once)
                inspect.unwrap(geoopt.optim.RiemannianAdam.step)(self)
            finally:
                self.param_groups = groups
            for group, entries in zip(groups, fused, strict=True):
                if entries:
                    self._fused_step(group, entries)
        return loss

    def _fused_parameters(self, group: dict) -> list[tuple[torch.Tensor, int | None]]:
        """``(parameter, group_size)`` of the parameters of ``group`` that take the fast path:
        PSI parameters grouped along axis 0, and Euclidean ones (``group_size`` ``None``)."""
        if group["foreach"] is False:
            return []
        entries = []
        for point in group["params"]:
            if point.grad is None or point.grad.is_sparse or _is_dtensor(point):
                continue
            manifold = _manifold_of(point, self._default_manifold)
            euclidean = type(manifold) is geoopt.Euclidean and manifold.ndim == 0
            group_size = None if euclidean else _fused_group_size(point, manifold)
            state = self.state[point]
            moments = [state[key] for key in _ADAM_MOMENTS if key in state]
            if (euclidean or group_size is not None) and all(m.is_contiguous() for m in moments):
                entries.append((point, group_size))
        return entries

    def _fused_step(self, group: dict, entries: list[tuple[torch.Tensor, int | None]]) -> None:
        stabilize = group["stabilize"]
        due = False
        for point, _ in entries:
            state = self.state[point]
            if not state:
                state["step"] = 0
                for key in _ADAM_MOMENTS[: 3 if group["amsgrad"] else 2]:
                    state[key] = torch.zeros_like(point)
            state["step"] += 1
            due = due or (stabilize is not None and state["step"] % stabilize == 0)
        hyper = dict(
            lr=group["lr"], betas=group["betas"], eps=group["eps"], amsgrad=group["amsgrad"]
        )
        psi = [(point, size, self.state[point]) for point, size in entries if size is not None]
        if psi:
            _psi_adam(psi, **hyper)
        euclidean = [point for point, size in entries if size is None]
        if euclidean:
            _foreach_euclidean_adam(
                euclidean, self.state, weight_decay=group["weight_decay"], **hyper
            )
        if due:
            self.stabilize_group({"params": [point for point, _ in entries]})


def _foreach_euclidean_adam(
    params: list[torch.Tensor],
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
) -> None:
    r"""geoopt's Adam step on Euclidean parameters (``state["step"]`` already counted) with
    ``torch._foreach_*`` operations, one batch per step count, leaving ``p.grad`` untouched.
    The same operations as geoopt's loop:
    :math:`\hat m / (\sqrt{v / (1 - \beta_2^t)} + \epsilon)`,
    :math:`\hat m = m / (1 - \beta_1^t)`."""
    beta1, beta2 = betas
    batches: dict[int, list[torch.Tensor]] = {}
    for point in params:
        batches.setdefault(state[point]["step"], []).append(point)
    for step, points in batches.items():
        states = [state[p] for p in points]
        grads = [p.grad for p in points]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, points, alpha=weight_decay)
        exp_avgs = [s["exp_avg"] for s in states]
        second = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(second, beta2)
        torch._foreach_add_(second, torch._foreach_mul(grads, grads), alpha=1 - beta2)
        if amsgrad:
            peaks = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(peaks, second)
            second = peaks
        denominator = torch._foreach_div(second, 1 - beta2**step)
        torch._foreach_sqrt_(denominator)
        torch._foreach_add_(denominator, eps)
        direction = torch._foreach_div(exp_avgs, 1 - beta1**step)
        torch._foreach_div_(direction, denominator)
        torch._foreach_add_(points, direction, alpha=-lr)


_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _manifold_of(point: torch.Tensor, default: geoopt.Manifold) -> geoopt.Manifold:
    """The manifold of a :class:`geoopt.ManifoldParameter`; for any other tensor its attribute
    ``manifold`` if it has one (a parameter re-created by a wrapper such as FSDP2's
    ``fully_shard``, which keeps a tensor's value but not its class), else ``default``."""
    manifold = getattr(point, "manifold", None)
    return default if manifold is None or not isinstance(manifold, geoopt.Manifold) else manifold


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
    if type(manifold) is not PSIManifold or point.dtype not in _FUSED_DTYPES:
        return None
    shape, numel = point.shape, point.numel()
    if not shape or numel == 0:
        return None
    if _is_dtensor(point):
        if manifold.dim is None or not point.to_local().is_contiguous():
            return None
        if not all(p.is_replicate() or p.is_shard(0) for p in point.placements):
            return None
    elif not point.is_contiguous():
        return None
    elif manifold.dim is None:
        return numel
    if manifold.dim % len(shape) != 0:
        return None
    return numel // shape[0]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its memory), any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


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
    compile: bool | None = None,
) -> None:
    """The fast step: the same update as :func:`_single_tensor_rsgd`.

    Euclidean parameters take ``torch._foreach_*`` operations (as ``torch.optim.SGD`` with
    ``foreach=True``, without writing into ``p.grad``), parameters on
    :class:`~psi_geoopt.PSIManifold` grouped along axis 0 one fused pass each
    (:func:`_psi_sgd`), every other parameter the reference loop.
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
    kernel_tasks, host = [], []
    for point, group_size in psi:
        buffer = None
        if momentum != 0:
            param_state = state[point]
            buffer = param_state.get("momentum_buffer")
            if buffer is None:
                buffer = param_state["momentum_buffer"] = torch.zeros_like(point)
                first = True
            elif not _local(buffer).is_contiguous():
                _single_tensor_rsgd([point], state, default_manifold, nesterov=nesterov, **hyper)
                continue
            else:
                first = False
        else:
            first = False
        if compile is not False and _takes_kernel(point, group_size):
            kernel_tasks.append((point, buffer, group_size, first))
        else:
            host.append((point, buffer, group_size, first))
    kernel = compile is not False
    # compile=None: the Numba loop on CPU where installed, else torch.compile for large groups
    numba_on_cpu = compile is None and _numba_step(numpy) is not None
    if compile is None:
        compile = (
            sum(p.numel() for p, *_ in host if not (numba_on_cpu and p.device.type == "cpu"))
            >= AUTO_COMPILE_NUMEL
        )
    tasks, compiled = [], []
    for point, buffer, group_size, first in host:
        by_numba = numba_on_cpu and point.device.type == "cpu"
        if compile and not first and not by_numba and not _is_dtensor(point):
            compiled.append((point, buffer, group_size))
            continue
        x = _local(point.detach())
        if x.numel() == 0:  # a rank that holds no group of this parameter
            continue
        buffer = None if buffer is None else _local(buffer)
        tasks.append((x, _local(point.grad), buffer, group_size, first))
    psi_hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    # the kernel first: the GPU runs it while the host prepares the other updates
    if kernel_tasks:
        _kernel_psi_sgd(kernel_tasks, **psi_hyper)
    _psi_sgd(tasks, kernel=kernel, **psi_hyper)
    if compiled:
        _compiled_psi_sgd(compiled, **psi_hyper)
    if other:
        _single_tensor_rsgd(other, state, default_manifold, nesterov=nesterov, **hyper)
    if euclidean:
        _foreach_euclidean_sgd(euclidean, state, nesterov=nesterov, **hyper)


_KERNELS: dict[str, ModuleType | None] = {}


def _kernel_module(name: str) -> ModuleType | None:
    """The kernel module ``psi_geoopt.<name>`` (``triton_step``, ``numba_step``), imported on
    first use; ``None`` where its compiler is not installed, or for ``triton_step`` with
    PyTorch < 2.5."""
    if name not in _KERNELS:
        module = None
        if name != "kernels.triton" or torch.torch_version.TorchVersion(torch.__version__) >= "2.5":
            try:
                module = importlib.import_module(f"{__package__}.{name}")
            except ImportError:
                pass
        _KERNELS[name] = module
    return _KERNELS[name]


def _triton_step() -> ModuleType | None:
    return _kernel_module("kernels.triton")


def _numba_step(xp: ModuleType) -> ModuleType | None:
    """:mod:`psi_geoopt.numba_step` where it runs: for the NumPy views of CPU tensors
    (``xp`` NumPy, :func:`_algebra_module`) with Numba installed; else ``None``."""
    return _kernel_module("kernels.numba") if xp is numpy else None


def _sgd_hyper_parameters(lr: float, momentum: float, dampening: float) -> tuple[float, ...]:
    r"""The hyper-parameters of the SGD step as both kernels (:mod:`psi_geoopt.triton_step`,
    :mod:`psi_geoopt.numba_step`) index them: :math:`\eta, \mu, 1 - \tau`."""
    return (lr, momentum, 1 - dampening)


def _adam_hyper_parameters(
    lr: float, betas: tuple[float, float], eps: float, step: int
) -> tuple[float, ...]:
    r"""The hyper-parameters of the Adam step at step ``step`` as both kernels index them: those
    of :func:`_sgd_hyper_parameters` with momentum and dampening :math:`\beta_1`, then
    :math:`\beta_2, 1 - \beta_2, \epsilon, 1 - \beta_1^t, 1 - \beta_2^t`. The differences
    are formed here, in double precision: :math:`1 - \beta_2` in float32 would be 1e-5 off."""
    beta1, beta2 = betas
    return (
        *_sgd_hyper_parameters(lr, beta1, beta1),
        beta2,
        1 - beta2,
        eps,
        1 - beta1**step,
        1 - beta2**step,
    )


def _takes_kernel(point: torch.Tensor, group_size: int) -> bool:
    """Whether the PSI step of ``point`` runs in the Triton kernel of
    :mod:`psi_geoopt.triton_step`: a CUDA tensor, not sharded (sharded groups run eagerly,
    the path tested with FSDP2), groups of at most ``MAX_ROW`` elements, Triton installed
    (PyTorch's CUDA builds on Linux bring it)."""
    if not point.is_cuda or _is_dtensor(point):
        return False
    module = _triton_step()
    return module is not None and group_size <= module.MAX_ROW


def _kernel_psi_sgd(
    tasks: list[tuple[torch.Tensor, torch.Tensor | None, int, bool]], **hyper
) -> None:
    """The PSI step of ``(parameter, buffer, group_size, first)`` entries (contiguous, not
    sharded) in the Triton kernel, one launch per device, dtype and ``first`` flag."""
    batches: dict[tuple, list[tuple]] = {}
    for point, buffer, group_size, first in tasks:
        entry = (point, point.grad.contiguous(), buffer, group_size)
        batches.setdefault((point.device, point.dtype, first), []).append(entry)
    for (_, _, first), batch in batches.items():
        _triton_step().psi_sgd_step(batch, first=first, **hyper)


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


def _psi_sgd(
    tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool]],
    *,
    kernel: bool = True,
    **hyper,
) -> None:
    """The PSI step on ``(x, grad, buffer, group_size, first)`` entries (``x`` and ``buffer``
    contiguous, ``buffer`` ``None`` without momentum), float16/bfloat16 computed in float32.

    On CPU with Numba installed (and ``kernel``): one call of the compiled loop of
    :mod:`psi_geoopt.numba_step` per tensor. Otherwise eagerly: the per-group sums of all
    tensors of one device, dtype and ``first`` flag are concatenated, so that the per-group
    scalar algebra of :func:`_psi_coefficients` runs once for all of them (on CPU both in
    NumPy, :func:`_algebra_module`); then one in-place update per tensor
    (:func:`_psi_apply`).
    """
    batches: dict[tuple, tuple[list[tuple[torch.Tensor | None, ...]], list[int]]] = {}
    for x, grad, buffer, size, first in tasks:
        batch, sizes = batches.setdefault((x.device, x.dtype, first), ([], []))
        batch.append((x, grad, buffer))
        sizes.append(size)
    for (device, dtype, first), (batch, sizes) in batches.items():
        xp = _algebra_module(device)
        work = _working_copies(batch, dtype)
        views = _row_views(work, sizes, xp)
        compiled = _numba_step(xp) if kernel else None
        if compiled is not None:
            compiled.psi_sgd_rows(views, first=first, **hyper)
            _write_back(batch, work, written_around_autograd=True)
            continue
        sums = _stacked_sums(views, not first and views[0][2] is not None, xp)
        coefficients = _as_tensor(_psi_coefficients(sums, xp=xp, first=first, **hyper))
        start = 0
        for x, grad, buffer in _row_views(work, sizes, torch):
            end = start + x.shape[0]
            _psi_apply(x, grad, buffer, coefficients[start:end], first=first, **hyper)
            start = end
        _write_back(batch, work)


def _psi_adam(
    entries: list[tuple[torch.Tensor, int, dict]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
) -> None:
    r"""The Adam step of ``(parameter, group_size, state)`` entries, ``state["step"]``
    already counted.

    Per group, :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2)(s_{xx} s_{uu} - s_{xu}^2)`
    (that is :math:`\|g\|_g^2`), and the update is :func:`_psi_coefficients`' with
    momentum and dampening :math:`\beta_1` and the learning rate of the group
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon))`,
    :math:`\hat v_t` the running maximum of :math:`v_t` with ``amsgrad``, else :math:`v_t`.
    Tensors are batched by device, compute dtype and step count; on CUDA each batch is one
    launch of the Triton kernel (:func:`psi_geoopt.triton_step.psi_adam_step`), on CPU with
    Numba installed each tensor one call of :func:`psi_geoopt.numba_step.psi_adam_rows`.
    """
    beta1, beta2 = betas
    moments = _ADAM_MOMENTS[: 3 if amsgrad else 2]
    batches: dict[tuple, tuple[list[tuple[torch.Tensor, ...]], list[int]]] = {}
    kernel_batches: dict[tuple, list[tuple]] = {}
    for point, size, state in entries:
        if _takes_kernel(point, size):
            peak = state["max_exp_avg_sq"] if amsgrad else None
            key = (point.device, point.dtype, state["step"])
            kernel_batches.setdefault(key, []).append(
                (point, point.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], peak, size)
            )
            continue
        batch, sizes = batches.setdefault((point.device, point.dtype, state["step"]), ([], []))
        batch.append((point.detach(), point.grad, *(state[key] for key in moments)))
        sizes.append(size)
    for (_, _, step), batch in kernel_batches.items():
        _triton_step().psi_adam_step(batch, lr=lr, betas=betas, eps=eps, step=step)
    for (device, dtype, step), (batch, sizes) in batches.items():
        xp = _algebra_module(device)
        work = _working_copies(batch, dtype)
        views = _row_views(work, sizes, xp)
        compiled = _numba_step(xp)
        if compiled is not None:
            compiled.psi_adam_rows(views, lr=lr, betas=betas, eps=eps, step=step)
            _write_back(batch, work, written_around_autograd=True)
            continue
        sums = _stacked_sums(views, True, xp)
        second = xp.concatenate([v[3][:, 0] for v in views])
        peak = xp.concatenate([v[4][:, 0] for v in views]) if amsgrad else None
        xx, xu, uu = sums[:, 0], sums[:, 1], sums[:, 2]
        second = beta2 * second + (1 - beta2) * _positive_part(xx * uu - xu * xu, xp)
        if peak is not None:
            peak = xp.maximum(peak, second)
        denominator = xp.sqrt((second if peak is None else peak) / (1 - beta2**step)) + eps
        step_sizes = lr / ((1 - beta1**step) * denominator)
        coefficients = _psi_coefficients(
            sums, xp=xp, lr=step_sizes, momentum=beta1, dampening=beta1, nesterov=False, first=False
        )
        coefficients = _as_tensor(coefficients)
        per_group = [_as_tensor(second)] if peak is None else [_as_tensor(second), _as_tensor(peak)]
        start = 0
        for x, grad, exp_avg, *moment_tensors in _row_views(work, sizes, torch):
            end = start + x.shape[0]
            _psi_apply(x, grad, exp_avg, coefficients[start:end], nesterov=False, first=False)
            for target, value in zip(moment_tensors, per_group, strict=True):
                target.copy_(value[start:end, None].expand_as(target))
            start = end
        _write_back(batch, work)


def _algebra_module(device: torch.device) -> ModuleType:
    """Where the per-group sums and scalar algebra of the PSI step of tensors on ``device``
    run (and the compiled loop of :mod:`psi_geoopt.numba_step`): NumPy on views of CPU
    tensors (the algebra is a few dozen operations on vectors of one entry per group, and
    NumPy's per-operation overhead is a fraction of PyTorch's), PyTorch elsewhere (NumPy
    would need a copy to the host and a synchronization)."""
    return numpy if device.type == "cpu" else torch


def _as_tensor(array) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, numpy.ndarray) else array


def _row_views(
    work: list[tuple[torch.Tensor | None, ...]], sizes: list[int], xp: ModuleType
) -> list[tuple[torch.Tensor | numpy.ndarray | None, ...]]:
    """The tensors of each tuple of ``work`` as ``(groups, size)`` rows, ``size`` the tuple's
    entry of ``sizes``: NumPy arrays sharing their memory (``xp`` NumPy; reshaped in NumPy,
    a fraction of PyTorch's per-call cost), else tensor views (a non-contiguous gradient
    is copied)."""
    if xp is numpy:
        return [
            tuple(None if t is None else t.numpy().reshape(-1, size) for t in tensors)
            for tensors, size in zip(work, sizes, strict=True)
        ]
    return [
        tuple(None if t is None else t.reshape(-1, size) for t in tensors)
        for tensors, size in zip(work, sizes, strict=True)
    ]


def _working_copies(
    batch: list[tuple[torch.Tensor | None, ...]], dtype: torch.dtype
) -> list[tuple[torch.Tensor | None, ...]]:
    """The tensors of ``batch``, all of ``dtype``, in the compute dtype: ``batch`` itself for
    float32 and float64, float32 copies of float16/bfloat16 ones (written back by
    :func:`_write_back`)."""
    compute = _compute_dtype(dtype)
    if compute == dtype:
        return batch
    return [tuple(None if t is None else t.to(compute) for t in views) for views in batch]


def _write_back(
    batch: list[tuple[torch.Tensor | None, ...]],
    work: list[tuple[torch.Tensor | None, ...]],
    *,
    written_around_autograd: bool = False,
) -> None:
    """Copy the working copies of :func:`_working_copies` back into the tensors of ``batch``
    (the gradient, second of each tuple, is only read). ``written_around_autograd``: the
    step wrote through NumPy views, so mark the tensors it wrote as modified in place, as
    PyTorch's in-place operations do, so that autograd still detects a backward through a
    graph that saved them."""
    for original, computed in zip(batch, work, strict=True):
        for target, source in zip(original, computed, strict=True):
            if target is None or target is original[1]:
                continue
            if source is not target:
                target.copy_(source)
            elif written_around_autograd:
                increment_version(target)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _psi_sums(x: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    r"""Per-row sums :math:`s_{xx}, s_{xu}, s_{uu}` (and :math:`s_{bu}, s_{bb}` given a
    buffer) as the columns of a ``(rows, 3)`` or ``(rows, 5)`` matrix."""
    columns = [_sum_of_squares(x), torch.linalg.vecdot(x, grad, dim=1), _sum_of_squares(grad)]
    if buffer is not None:
        columns += [torch.linalg.vecdot(buffer, grad, dim=1), _sum_of_squares(buffer)]
    return torch.stack(columns, dim=1)


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1).square()


def _stacked_sums(views: list[tuple], with_buffer: bool, xp: ModuleType):
    """:func:`_psi_sums` of every ``(x, grad, buffer, ...)`` of ``views`` (tensors, or NumPy
    arrays with ``xp`` NumPy), stacked. In NumPy each sum is one call of
    :func:`numpy.vecdot` into its column, half the per-call cost of PyTorch's (float32 sums
    accumulate in float32, as on GPUs; the norm kept over 3000 steps is tested)."""
    if xp is torch:
        return torch.cat(
            [_psi_sums(x, grad, b if with_buffer else None) for x, grad, b, *_ in views]
        )
    sums = numpy.empty(
        (sum(v[0].shape[0] for v in views), 5 if with_buffer else 3), views[0][0].dtype
    )
    start = 0
    for x, grad, buffer, *_ in views:
        end = start + x.shape[0]
        out = sums[start:end]
        numpy.vecdot(x, x, out=out[:, 0])
        numpy.vecdot(x, grad, out=out[:, 1])
        numpy.vecdot(grad, grad, out=out[:, 2])
        if with_buffer:
            numpy.vecdot(buffer, grad, out=out[:, 3])
            numpy.vecdot(buffer, buffer, out=out[:, 4])
        start = end
    return sums


def _psi_coefficients(
    sums: torch.Tensor,
    *,
    xp: ModuleType = torch,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
) -> torch.Tensor:
    r"""Per-group coefficients of one PSI step, from the per-group sums of :func:`_psi_sums`.

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

    The new point is written as an increment of :math:`x`, rounded once, as in
    :meth:`~psi_geoopt.PSIManifold.retr`: the radial factors are formed from their
    differences to 1,

    .. math::

        \sqrt{\frac{s_{xx}}{\|y\|^2}} - 1 = \frac{-\eta^2 \|d\|^2}
        {\|y\| (\|x\| + \|y\|)}, \qquad
        \sqrt{\frac{\|y\|^2}{s_{xx}}} - 1 = \frac{\eta^2 \|d\|^2}
        {\|x\| (\|x\| + \|y\|)},

    because in float32 the factors themselves round to 1 once :math:`\eta\|d\|_g` is below
    about :math:`3 \cdot 10^{-4}`, and the norm would then creep up step after step.

    Returns a ``(rows, k)`` matrix of per-group coefficients of the update, in the form
    :func:`_psi_apply` applies it. With :math:`b_+ = e_x x + e_u u + e_b b`,
    :math:`x_+ = x + (c_x - 1) x + c_u u + c_b b` and :math:`\gamma = \sqrt{\|y\|^2 / s_{xx}}`
    its columns are

    * without momentum: :math:`c_x - 1, c_u`;
    * with momentum: :math:`e_x, e_u, \gamma - 1, -\eta\gamma` and, after the first step,
      :math:`e_b` (here :math:`x_+ = x + (\gamma - 1) x - \eta\gamma\, b_+`);
    * with Nesterov: :math:`e_x, e_u, c_x - 1, c_u` and, after the first step, :math:`e_b, c_b`.

    In the buffer's terms :math:`b' = k_b b + k g` (:math:`k_b = \mu, k = 1 - \tau`; at the
    first step :math:`k_b = 0, k = 1`) and :math:`d = \delta_b b + \delta_g g`, and with
    :math:`a = \eta\kappa`: :math:`e_b = k_b - a \delta_b`, :math:`e_g = k - a \delta_g`,
    :math:`e_x = \kappa - e_g s_{xu}`, :math:`e_u = e_g s_{xx}`, :math:`c_b = -\eta\, \delta_b
    \sqrt{s_{xx}}/\|y\|`, likewise :math:`c_g`, and :math:`c_x - 1 = \sqrt{s_{xx}}/\|y\| - 1
    - c_g s_{xu}`, :math:`c_u = c_g s_{xx}`. ``lr`` may be a vector, one learning rate per
    group (:class:`RiemannianAdam`'s adaptive step).

    ``sums`` is a tensor with ``xp=torch`` or a NumPy array with ``xp=numpy``
    (:func:`_algebra_module`).
    """
    xx, xu, uu = sums[:, 0], sums[:, 1], sums[:, 2]
    gg = xx * _positive_part(xx * uu - xu * xu, xp)
    with_buffer = momentum != 0 and not first
    bu, bb = (sums[:, 3], sums[:, 4]) if with_buffer else (0.0, 0.0)
    bx_coeff, bu_coeff, bb_coeff, x_shift, u_coeff, b_coeff, growth = _step_coefficients(
        xx, xu, gg, bu, bb, lr, momentum, 1 - dampening, not with_buffer, nesterov
    )
    if momentum == 0:  # d = g, as at a first step
        return xp.stack([x_shift, u_coeff], axis=1)
    columns = [bx_coeff, bu_coeff]
    columns += [x_shift, u_coeff] if nesterov else [growth, -lr * (1 + growth)]
    if not first:
        columns += [bb_coeff, b_coeff] if nesterov else [bb_coeff]
    return xp.stack(columns, axis=1)


def _step_coefficients(xx, xu, gg, bu, bb, lr, momentum, keep, first, nesterov):
    r"""The closed forms of :func:`_psi_coefficients` from the per-group sums
    :math:`s_{xx}, s_{xu}`, :math:`\|g\|^2` and :math:`s_{bu}, s_{bb}` (ignored at the
    ``first`` step), with ``keep`` :math:`= 1 - \tau`. Only arithmetic operators, so that
    one source serves NumPy and PyTorch vectors of groups and, compiled by Numba, the
    scalars of :mod:`psi_geoopt.numba_step`. Returns :math:`e_x, e_u, e_b`, the
    coefficients :math:`c_x - 1, c_u, c_b` of
    :math:`x_+ = \sqrt{s_{xx}} / \|y\|\,(x - \eta d)` and :math:`\gamma - 1`.

    The radial factors are formed from their differences to 1, without cancellation:
    :math:`\sqrt{s_{xx}} / \|y\| - 1 = -\eta^2 \|d\|^2 / (\|y\| (\|x\| + \|y\|))` and
    :math:`\gamma - 1 = \|y\| / \sqrt{s_{xx}} - 1 = \eta^2 \|d\|^2 / (\|x\| (\|x\| + \|y\|))`.
    """
    if first:  # b' = g
        keep_b, keep_g = 0.0, 1.0
        bb_new = bg_new = gg
    else:  # b' = mu b + (1 - tau) g, with <b, g> = s_xx s_bu
        keep_b, keep_g = momentum, keep
        bg = xx * bu
        bb_new = momentum * momentum * bb + 2 * momentum * keep * bg + keep * keep * gg
        bg_new = momentum * bg + keep * gg
    if nesterov:  # d = g + mu b'
        direction_b, direction_g = momentum * keep_b, 1 + momentum * keep_g
        dd = gg + 2 * momentum * bg_new + momentum * momentum * bb_new
        bd = bg_new + momentum * bb_new
    else:  # d = b'
        direction_b, direction_g = keep_b, keep_g
        dd = bd = bb_new
    step = lr * lr * dd  # |y|^2 = s_xx + step
    radius, new_radius = xx**0.5, (xx + step) ** 0.5
    total = radius + new_radius
    scale, shrink, growth = (
        radius / new_radius,
        -step / (new_radius * total),
        step / (radius * total),
    )
    kappa = lr * bd / (xx + step)
    # b_+ = b' + kappa (x - lr d), x_+ = (sqrt(s_xx) / |y|)(x - lr d)
    along_g, along = keep_g - lr * kappa * direction_g, -lr * scale * direction_g
    return (
        kappa - along_g * xu,
        along_g * xx,
        keep_b - lr * kappa * direction_b,
        shrink - along * xu,
        along * xx,
        -lr * scale * direction_b,
        growth,
    )


def _positive_part(values, xp: ModuleType):
    r""":math:`\max(v, 0)`: a negative value, a rounding error, becomes 0 (NumPy's ``clip``
    is a slow Python wrapper)."""
    return numpy.maximum(values, 0) if xp is numpy else values.clamp(min=0)


def _psi_apply(
    x: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    coefficients: torch.Tensor,
    *,
    nesterov: bool,
    first: bool,
    **_,
) -> None:
    """The in-place update of one tensor from its rows of :func:`_psi_coefficients`
    (``buffer`` zeros at the ``first`` step)."""
    columns = coefficients.T.unsqueeze(-1).unbind()
    if buffer is None:
        x_shift, u_coeff = columns
        x.add_(x.mul(x_shift).addcmul_(grad, u_coeff))
    elif nesterov:
        bx_coeff, bu_coeff, x_shift, u_coeff, *with_buffer = columns
        increment = x.mul(x_shift).addcmul_(grad, u_coeff)
        if not first:
            bb_coeff, b_coeff = with_buffer
            increment.addcmul_(buffer, b_coeff)
            buffer.mul_(bb_coeff)
        buffer.addcmul_(grad, bu_coeff).addcmul_(x, bx_coeff)
        x.add_(increment)
    else:  # the buffer first, then x from it
        bx_coeff, bu_coeff, growth, b_after, *with_buffer = columns
        if not first:
            buffer.mul_(with_buffer[0])
        buffer.addcmul_(grad, bu_coeff).addcmul_(x, bx_coeff)
        x.addcmul_(x, growth).addcmul_(buffer, b_after)


def _psi_fused_step(
    x: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None, **hyper
) -> None:
    """One tensor's step (not a buffer's first) on ``(groups, group_size)`` views: the sums,
    the coefficients and :func:`_psi_apply` on copies in the compute dtype (the tensors
    themselves in float32 and float64), which :func:`torch.compile` fuses into one reduction
    pass and one elementwise pass. float16/bfloat16 are computed in float32."""
    dtype = _compute_dtype(x.dtype)
    point, gradient = x.to(dtype), grad.to(dtype)
    moment = None if buffer is None else buffer.to(dtype)
    coefficients = _psi_coefficients(_psi_sums(point, gradient, moment), first=False, **hyper)
    _psi_apply(point, gradient, moment, coefficients, first=False, **hyper)
    if point is not x:
        x.copy_(point)
    if moment is not buffer:
        buffer.copy_(moment)


def _psi_fused_steps(
    xs: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor | None], **hyper
) -> None:
    """:func:`_psi_fused_step` for every tensor of a parameter group, given as
    ``(groups, group_size)`` views: one call, so that :func:`torch.compile` makes one graph
    of the whole step and the per-call overhead (guards, kernel launches) is paid once per
    step rather than once per tensor. (The views are made outside the graph: reshaping
    inside it made inductor's CPU kernels three times slower.)"""
    for x, grad, buffer in zip(xs, grads, buffers, strict=True):
        _psi_fused_step(x, grad, buffer, **hyper)


def _compiled_psi_sgd(
    entries: list[tuple[torch.Tensor, torch.Tensor | None, int]], *, lr: float, **hyper
) -> None:
    """The PSI step of ``(parameter, buffer, group_size)`` entries (not a buffer's first step,
    contiguous, not sharded) through :func:`_compiled_psi_steps`, one call per device and
    compute dtype.

    The learning rate is passed as a tensor, a graph input, so that a scheduler changing it
    causes no recompilation.
    """
    batches: dict[tuple[torch.device, torch.dtype], list] = {}
    for entry in entries:
        batches.setdefault((entry[0].device, _compute_dtype(entry[0].dtype)), []).append(entry)
    for (device, dtype), batch in batches.items():
        # in the compute dtype: a float64 scalar would keep inductor's CPU kernels from
        # vectorizing float32 arithmetic
        step_size = torch.tensor(lr, dtype=dtype, device=device)
        _compiled_psi_steps()(
            [point.detach().view(-1, size) for point, _, size in batch],
            [point.grad.reshape(-1, size) for point, _, size in batch],
            [None if buffer is None else buffer.view(-1, size) for _, buffer, size in batch],
            lr=step_size,
            **hyper,
        )


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_psi_steps() -> Callable[..., None]:
    """:func:`_psi_fused_steps` through :func:`torch.compile`; eager where compilation fails.

    The graph is specialised to the shapes of the parameter group (a model's parameters keep
    theirs). Inductor's combo kernels (horizontal fusion of the tensors' kernels, where this
    version has them) cut the number of kernel launches: on an H200 the ResNet-50 step went
    from 5.9x to 4.3x the time of ``torch.optim.SGD``, on CPUs they are neutral to slightly
    faster (``benchmarks/RESULTS.md``). A buffer's first step runs eagerly: it happens once,
    and the C++ code generation of torch 2.13 fails on that variant of the graph.
    """
    if "steps" not in _COMPILED:
        options = {"combo_kernels": True} if _inductor_has("combo_kernels") else None
        compiled = torch.compile(_psi_fused_steps, dynamic=False, options=options)

        def steps(*args, **kwargs) -> None:
            if _COMPILED.get("failed"):
                return _psi_fused_steps(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # a missing compiler or an unsupported backend
                warnings.warn(
                    f"RiemannianSGD(compile=True): torch.compile failed ({error!r:.200}); "
                    "running the step eagerly",
                    RuntimeWarning,
                    stacklevel=4,
                )
                _COMPILED["failed"] = steps
                return _psi_fused_steps(*args, **kwargs)

        _COMPILED["steps"] = steps
    return _COMPILED["steps"]


def _inductor_has(option: str) -> bool:
    try:
        from torch._inductor import config
    except ImportError:
        return False
    return hasattr(config, option)
