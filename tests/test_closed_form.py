"""The closed forms of the fused PSI step (:mod:`psi_geoopt.optim._closed_form`): against the
definitions they replace, and the same numbers in every backend that runs them — NumPy and
PyTorch on vectors of groups (the eager and :func:`torch.compile` paths), Numba on scalars
(the CPU loop). The Triton kernel's copy is compared in its interpreter by
``tests/test_kernels_triton.py``."""

from __future__ import annotations

import numpy
import pytest
import torch
from conftest import (
    ADAM_CASES,
    CLOSED_FORM_CASES,
    CLOSED_FORM_INPUTS,
    closed_form_inputs,
    closed_form_outputs,
)

from psi_geoopt.optim._closed_form import (
    adam_hyper_parameters,
    adam_step_size,
    gradient_norm,
    specialize,
    step_coefficients,
)

NUMPY = {
    f.__name__: specialize(f, numpy) for f in (gradient_norm, step_coefficients, adam_step_size)
}


def case_id(case: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in case.items())


def coefficients(inputs: dict, case: dict, forms: dict = NUMPY) -> tuple:
    """The seven coefficients of :func:`step_coefficients` from ``inputs`` (vectors)."""
    xx, xu, uu = inputs["xx"], inputs["xu"], inputs["uu"]
    gg = xx * forms["gradient_norm"](xx, xu, uu)
    return forms["step_coefficients"](xx, xu, gg, inputs["bu"], inputs["bb"], inputs["lr"], **case)


def per_group_error(actual: numpy.ndarray, expected: numpy.ndarray, scale: numpy.ndarray):
    return numpy.max(numpy.linalg.norm(actual - expected, axis=1) / scale)


@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=case_id)
def test_coefficients_give_the_reference_step(case):
    """The step written with the coefficients is the reference step on the vectors: the
    Riemannian gradient :math:`g = s_{xx} u - s_{xu} x`, the buffer :math:`b'`, the direction
    :math:`d`, :math:`y = x - \\eta d`, :math:`x_+ = \\|x\\| y / \\|y\\|` and the transported
    buffer :math:`b_+ = b' - \\langle b', x_+\\rangle x_+ / \\|x\\|^2`."""
    inputs = closed_form_inputs()
    x, u, b, lr = inputs["x"], inputs["u"], inputs["b"], inputs["lr"][:, None]
    xx, xu = inputs["xx"][:, None], inputs["xu"][:, None]
    momentum, keep = case["momentum"], case["keep"]
    g = xx * u - xu * x
    buffer = g if case["first"] or momentum == 0 else momentum * b + keep * g
    direction = g + momentum * buffer if case["nesterov"] else buffer
    y = x - lr * direction
    x_new = numpy.sqrt(xx) * y / numpy.linalg.norm(y, axis=1, keepdims=True)
    b_new = buffer - numpy.vecdot(buffer, x_new)[:, None] * x_new / xx
    e_x, e_u, e_b, shift, c_u, c_b, growth = (c[:, None] for c in coefficients(inputs, case))
    radius = numpy.sqrt(inputs["xx"])
    assert per_group_error(x + shift * x + c_u * u + c_b * b, x_new, radius) <= 1e-10
    assert numpy.abs(shift).max() > 1e-6  # the step moved the points
    if momentum != 0:
        b_closed = e_x * x + e_u * u + e_b * b
        scale = numpy.linalg.norm(b_new, axis=1)
        assert per_group_error(b_closed, b_new, scale) <= 1e-10
        if not case["nesterov"]:  # x_+ from the new buffer
            from_buffer = x + growth * x - lr * (1 + growth) * b_closed
            assert per_group_error(from_buffer, x_new, radius) <= 1e-10


@pytest.mark.parametrize("adam", ADAM_CASES)
def test_adam_step_size_is_adams(adam):
    r""":math:`\|g\|_g^2`, the second moment, its maximum and the group's learning rate
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon))`."""
    beta1, beta2, eps, step, amsgrad = adam
    inputs = closed_form_inputs()
    x, u, xx, xu = inputs["x"], inputs["u"], inputs["xx"], inputs["xu"]
    norm = NUMPY["gradient_norm"](xx, xu, inputs["uu"])
    g = xx[:, None] * u - xu[:, None] * x
    numpy.testing.assert_allclose(norm, numpy.vecdot(g, g) / xx, rtol=1e-12)
    lr, _, _, *hyper = adam_hyper_parameters(0.01, (beta1, beta2), eps, step)
    second, moment, rate = NUMPY["adam_step_size"](
        inputs["second"], inputs["peak"], norm, lr, *hyper, amsgrad
    )
    expected = beta2 * inputs["second"] + (1 - beta2) * norm
    numpy.testing.assert_allclose(second, expected, rtol=1e-15)
    expected_moment = numpy.maximum(inputs["peak"], expected) if amsgrad else expected
    numpy.testing.assert_array_equal(moment, expected_moment)
    denominator = numpy.sqrt(expected_moment / (1 - beta2**step)) + eps
    numpy.testing.assert_allclose(rate, 0.01 / ((1 - beta1**step) * denominator), rtol=1e-15)


def backend_outputs(backend: str, inputs: dict, case: dict, adam: tuple) -> list[numpy.ndarray]:
    """:func:`closed_form_outputs` computed by ``backend``: NumPy or PyTorch on vectors of
    groups, Numba on one group at a time."""
    group = {name: inputs[name] for name in CLOSED_FORM_INPUTS}
    if backend == "numpy":
        return list(closed_form_outputs(NUMPY, group, case, adam))
    if backend == "torch":
        forms = {f.__name__: f for f in (gradient_norm, step_coefficients, adam_step_size)}
        group = {name: torch.from_numpy(values) for name, values in group.items()}
        return [torch.as_tensor(v).numpy() for v in closed_form_outputs(forms, group, case, adam)]
    from psi_geoopt.optim.kernels import numba as kernels

    forms = {
        "gradient_norm": kernels._gradient_norm,
        "step_coefficients": kernels._step_coefficients,
        "adam_step_size": kernels._adam_step_size,
    }
    groups = [dict(zip(group, values, strict=True)) for values in zip(*group.values(), strict=True)]
    outputs = [closed_form_outputs(forms, one, case, adam) for one in groups]
    return [numpy.array(column) for column in zip(*outputs, strict=True)]


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=case_id)
def test_every_backend_computes_the_same_coefficients(backend, case):
    """The same closed forms, bound to PyTorch or compiled by Numba, give NumPy's numbers on
    random inputs: PyTorch's to an ulp or two, Numba's to 1e-10 (it contracts products and sums
    into fused multiply-adds, which changes the rounding of the differences); a formula that
    drifted would be off by far more."""
    inputs = closed_form_inputs(seed=1)
    adam = ADAM_CASES[1]
    expected = backend_outputs("numpy", inputs, case, adam)
    actual = backend_outputs(backend, inputs, case, adam)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        rtol = 1e-14 if backend == "torch" else 1e-10
        numpy.testing.assert_allclose(a, e, rtol=rtol, atol=0, err_msg=str(index))
