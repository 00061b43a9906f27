"""The closed forms of the fused PSI step: per-group coefficients from per-group sums."""

from __future__ import annotations

from types import ModuleType

import numpy
import torch


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
