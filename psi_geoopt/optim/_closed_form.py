r"""The closed forms of the fused PSI step: the one source of every backend's arithmetic.

Per group, with :math:`u = \nabla f(x)` (weight decay is radial and drops out) and
:math:`b` the transported buffer of the previous step, the reference step of
:class:`~psi_geoopt.optim.RiemannianSGD` computes :math:`g = \|x\|^2 u - \langle u, x\rangle x`,
:math:`b' = \mu b + (1 - \tau) g` (:math:`b' = g` at the first step), :math:`d = b'` or
:math:`g + \mu b'`, :math:`y = x - \eta d`, :math:`x_+ = \|x\|\, y / \|y\|` and
:math:`b_+ = b' - \langle b', x_+\rangle x_+ / \|x\|^2`. Three facts of the geometry remove
every norm of an intermediate vector:

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
:math:`\langle b', d\rangle` by bilinearity, then :math:`\|y\|^2 = s_{xx} + \eta^2 \|d\|^2`
and the outputs are per-group linear combinations of the inputs, **one read-write pass**:

.. math::

    x_+ = \sqrt{s_{xx} / \|y\|^2}\; y, \qquad
    b_+ = b' + \kappa\, y, \quad \kappa = \eta \langle b', d\rangle / \|y\|^2 .

Without Nesterov (:math:`d = b'`), :math:`y = (\|y\|^2 / s_{xx})(x - \eta b_+)`, so
:math:`x_+ = \sqrt{\|y\|^2 / s_{xx}}\,(x - \eta b_+)` is computed from the new buffer in
place. Memory traffic per element: read :math:`x, u, b` twice, write :math:`x, b` once — 8
tensor passes, as many as the three in-place ``foreach`` operations of
:class:`torch.optim.SGD` with momentum (when the pass is fused by :func:`torch.compile`; the
kernels read the row the second time from cache: five passes). Without momentum:
:math:`s_{xx}, s_{xu}, s_{uu}`, then :math:`x_+ = \sqrt{s_{xx}/(s_{xx} + \eta^2\|g\|^2)}\,
(x - \eta g)`, the first step's update.

The new point is written as an increment of :math:`x`, rounded once, as in
:meth:`~psi_geoopt.PSIManifold.retr`: the radial factors are formed from their differences
to 1,

.. math::

    \sqrt{\frac{s_{xx}}{\|y\|^2}} - 1 = \frac{-\eta^2 \|d\|^2}
    {\|y\| (\|x\| + \|y\|)}, \qquad
    \sqrt{\frac{\|y\|^2}{s_{xx}}} - 1 = \frac{\eta^2 \|d\|^2}
    {\|x\| (\|x\| + \|y\|)},

because in float32 the factors themselves round to 1 once :math:`\eta\|d\|_g` is below about
:math:`3 \cdot 10^{-4}`, and the norm would then creep up step after step.

:class:`~psi_geoopt.optim.RiemannianAdam` takes the same step with momentum and dampening
:math:`\beta_1` and, per group, the learning rate of :func:`adam_step_size`.

**One source, four backends.** :func:`gradient_norm`, :func:`step_coefficients` and
:func:`adam_step_size` are written in the subset of Python that NumPy arrays, PyTorch tensors,
Numba's ``njit`` and Triton's ``jit`` all accept: arithmetic operators, ``xp.sqrt`` and
``xp.maximum``, one assignment per statement, ``if`` on flags (Python booleans, or Triton
``constexpr``). As defined here ``xp`` is :class:`TorchOperations`, for PyTorch tensors (the
eager path off the CPU, and :func:`torch.compile`, :mod:`.kernels.eager`); every other
backend runs copies bound to its own namespace by :func:`specialize`: NumPy for the eager CPU
path and, compiled, for the Numba loop of :mod:`.kernels.numba`; ``triton.language`` for the
Triton kernel of :mod:`.kernels.triton`.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

__all__ = [
    "TorchOperations",
    "adam_hyper_parameters",
    "adam_step_size",
    "gradient_norm",
    "sgd_hyper_parameters",
    "specialize",
    "step_coefficients",
]


class TorchOperations:
    """``sqrt`` and ``maximum`` of PyTorch tensors as the closed forms call them
    (:func:`torch.maximum` takes no Python number, :func:`torch.clamp_min` does)."""

    sqrt = staticmethod(torch.sqrt)
    maximum = staticmethod(torch.clamp_min)


xp = TorchOperations
"""The namespace the closed forms take ``sqrt`` and ``maximum`` from: PyTorch's here, where
:func:`torch.compile` traces them; every other backend runs copies bound to its own by
:func:`specialize`."""


def specialize(function: Callable, xp: object) -> Callable:
    """A copy of the closed form ``function`` whose ``xp.sqrt`` and ``xp.maximum`` are those
    of ``xp`` (a module, or an object with the two as attributes): the same code object, so
    the same source for Numba's and Triton's compilers, which read ``xp`` from the copy's
    globals."""
    namespace = {**function.__globals__, "xp": xp}
    copy = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__
    )
    copy.__doc__, copy.__qualname__ = function.__doc__, function.__qualname__
    return copy


def gradient_norm(xx, xu, uu):
    r""":math:`\|g\|_g^2 = s_{xx} s_{uu} - s_{xu}^2`, the squared norm of the Riemannian
    gradient in the metric of the group (:math:`\|g\|^2 = s_{xx} \|g\|_g^2`); a negative
    value, a rounding error, becomes 0."""
    return xp.maximum(xx * uu - xu * xu, 0.0)


def step_coefficients(xx, xu, gg, bu, bb, lr, momentum, keep, first, nesterov):
    r"""The per-group coefficients of the step from the sums :math:`s_{xx}, s_{xu}`,
    :math:`\|g\|^2` and :math:`s_{bu}, s_{bb}` (ignored at the ``first`` step), with ``keep``
    :math:`= 1 - \tau`; ``lr`` may be one learning rate per group (Adam).

    Returns :math:`e_x, e_u, e_b` of :math:`b_+ = e_x x + e_u u + e_b b`, then
    :math:`c_x - 1, c_u, c_b` of :math:`x_+ = x + (c_x - 1) x + c_u u + c_b b`, and
    :math:`\gamma - 1` with :math:`\gamma = \|y\| / \sqrt{s_{xx}}`, so that without Nesterov
    :math:`x_+ = x + (\gamma - 1) x - \eta\gamma\, b_+`. At the first step, and without
    momentum, :math:`b' = g`.

    In the buffer's terms :math:`b' = k_b b + k g` (:math:`k_b = \mu, k = 1 - \tau`; at the
    first step :math:`k_b = 0, k = 1`) and :math:`d = \delta_b b + \delta_g g`, and with
    :math:`a = \eta\kappa`: :math:`e_b = k_b - a \delta_b`, :math:`e_g = k - a \delta_g`,
    :math:`e_x = \kappa - e_g s_{xu}`, :math:`e_u = e_g s_{xx}`, :math:`c_b = -\eta\,
    \delta_b \sqrt{s_{xx}}/\|y\|`, likewise :math:`c_g`, and :math:`c_x - 1 = \sqrt{s_{xx}}
    /\|y\| - 1 - c_g s_{xu}`, :math:`c_u = c_g s_{xx}`.
    """
    if first:  # b' = g
        keep_b = 0.0
        keep_g = 1.0
        bb_new = gg
        bg_new = gg
    else:  # b' = mu b + (1 - tau) g, with <b, g> = s_xx s_bu
        keep_b = momentum
        keep_g = keep
        bg = xx * bu
        bb_new = momentum * momentum * bb + 2.0 * momentum * keep * bg + keep * keep * gg
        bg_new = momentum * bg + keep * gg
    if nesterov:  # d = g + mu b'
        direction_b = momentum * keep_b
        direction_g = 1.0 + momentum * keep_g
        dd = gg + 2.0 * momentum * bg_new + momentum * momentum * bb_new
        bd = bg_new + momentum * bb_new
    else:  # d = b'
        direction_b = keep_b
        direction_g = keep_g
        dd = bb_new
        bd = bb_new
    step = lr * lr * dd  # |y|^2 = s_xx + step
    radius = xp.sqrt(xx)
    new_radius = xp.sqrt(xx + step)
    total = radius + new_radius
    scale = radius / new_radius
    shrink = -step / (new_radius * total)  # scale - 1
    growth = step / (radius * total)  # 1 / scale - 1
    kappa = lr * bd / (xx + step)
    # b_+ = b' + kappa (x - lr d), x_+ = scale (x - lr d)
    along_g = keep_g - lr * kappa * direction_g
    along = -lr * scale * direction_g
    return (
        kappa - along_g * xu,
        along_g * xx,
        keep_b - lr * kappa * direction_b,
        shrink - along * xu,
        along * xx,
        -lr * scale * direction_b,
        growth,
    )


def adam_step_size(second, peak, norm, lr, beta2, keep2, eps, bias1, bias2, amsgrad):
    r"""Adam's second moment and learning rate of a group.

    From the previous second moment :math:`v_{t-1}` (``second``), its running maximum
    :math:`\hat v_{t-1}` (``peak``, read only with ``amsgrad``) and :math:`\|g\|_g^2`
    (``norm``, :func:`gradient_norm`), with ``keep2`` :math:`= 1 - \beta_2` and the bias
    corrections ``bias1``, ``bias2`` :math:`= 1 - \beta_1^t, 1 - \beta_2^t`: returns
    :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) \|g\|_g^2`, the moment the step divides by
    (:math:`\hat v_t = \max(\hat v_{t-1}, v_t)` with ``amsgrad``, else :math:`v_t`) and the
    group's learning rate :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} +
    \epsilon))`, with which :func:`step_coefficients` (momentum and dampening
    :math:`\beta_1`) gives the step of geoopt's Riemannian Adam.
    """
    new_second = beta2 * second + keep2 * norm
    moment = new_second
    if amsgrad:
        moment = xp.maximum(peak, new_second)
    step_size = lr / (bias1 * (xp.sqrt(moment / bias2) + eps))
    return new_second, moment, step_size


def sgd_hyper_parameters(lr: float, momentum: float, dampening: float) -> tuple[float, ...]:
    r"""The hyper-parameters of the SGD step as both kernels (:mod:`.kernels.triton`,
    :mod:`.kernels.numba`) index them: :math:`\eta, \mu, 1 - \tau`."""
    return (lr, momentum, 1 - dampening)


def adam_hyper_parameters(
    lr: float, betas: tuple[float, float], eps: float, step: int
) -> tuple[float, ...]:
    r"""The hyper-parameters of the Adam step at step ``step`` as both kernels index them: those
    of :func:`sgd_hyper_parameters` with momentum and dampening :math:`\beta_1`, then the
    arguments of :func:`adam_step_size`: :math:`\beta_2, 1 - \beta_2, \epsilon, 1 - \beta_1^t,
    1 - \beta_2^t`. The differences are formed here, in double precision: :math:`1 - \beta_2`
    in float32 would be 1e-5 off."""
    beta1, beta2 = betas
    return (
        *sgd_hyper_parameters(lr, beta1, beta1),
        beta2,
        1 - beta2,
        eps,
        1 - beta1**step,
        1 - beta2**step,
    )
