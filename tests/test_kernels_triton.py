"""The Triton kernel of the PSI SGD and Adam steps (:mod:`psi_geoopt.optim.kernels.triton`)
against the reference loop and geoopt's Adam.

On a machine with a CUDA GPU the tests run the compiled kernel on CUDA tensors. Without one,
:func:`test_kernel_tests_in_interpreter` runs them again in a fresh Python process with
``TRITON_INTERPRET=1``, Triton's interpreter, on CPU tensors (the interpreter is chosen when
the kernel is defined, so it needs a process of its own).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")

import triton.language as tl  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
    pytest.skip(
        "the kernel's tests use the ahead-of-time API of Triton 3.9 (ASTSource(constexprs=...)), "
        f"which Triton {triton.__version__} lacks",
        allow_module_level=True,
    )
from conftest import (  # noqa: E402
    ADAM_CASES,
    ADAM_CONFIGS,
    CLOSED_FORM_CASES,
    CLOSED_FORM_INPUTS,
    CONFIGS,
    TOLERANCE,
    assert_same_adam_state,
    assert_same_trajectory,
    closed_form_inputs,
    closed_form_outputs,
    make_params,
    run,
    run_adam,
)

from psi_geoopt.optim import RiemannianSGD, _fused  # noqa: E402
from psi_geoopt.optim._closed_form import (  # noqa: E402
    adam_hyper_parameters,
    adam_step_size,
    gradient_norm,
    specialize,
    step_coefficients,
)
from psi_geoopt.optim.kernels.triton import (  # noqa: E402
    _adam_step_size,
    _gradient_norm,
    _step_coefficients,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
STEPS = 6 if INTERPRETED else 25  # the interpreter runs every program in Python
kernel_test = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 (see test_kernel_tests_in_interpreter)",
)


def test_kernel_tests_in_interpreter():
    if INTERPRETED or torch.cuda.is_available():
        pytest.skip("the kernel tests run in this process")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(
        [*command, "-k", "not interpreter and not compiles_for_gpus"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.skipif(INTERPRETED, reason="compiles for GPUs, which the interpreter replaces")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("storage", ["float64", "float32", "bfloat16", "float16"])
def test_kernel_compiles_for_gpus(capability, storage):
    """Every variant of the kernel (flags and storage dtypes) compiles to a CUDA binary for
    Ampere and Hopper, ahead of time and without a GPU, through Triton's NVIDIA backend and
    the ``ptxas`` it ships: the interpreter, which runs the other tests here on CPU, does not
    type-check the kernel as the compiler does."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from psi_geoopt.optim.kernels.triton import _psi_kernel

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    compute = "float64" if storage == "float64" else "float32"
    names = _psi_kernel.arg_names
    pointers = {
        "rows": "*i64",
        "tensors": "*i64",
        "hyper": "*fp64" if storage == "float64" else "*fp32",
    }
    signature = {name: pointers.get(name, "constexpr") for name in names}
    variants = [
        dict(MOMENTUM=False, FIRST=False, NESTEROV=False, ADAM=False, AMSGRAD=False),
        *(
            dict(MOMENTUM=True, FIRST=first, NESTEROV=nesterov, ADAM=False, AMSGRAD=False)
            for first in (False, True)
            for nesterov in (False, True)
        ),
        *(
            dict(MOMENTUM=True, FIRST=False, NESTEROV=False, ADAM=True, AMSGRAD=amsgrad)
            for amsgrad in (False, True)
        ),
    ]
    for flags in variants:
        values = {
            "STORAGE": getattr(tl, storage),
            "COMPUTE": getattr(tl, compute),
            "BLOCK": 1024,
            **flags,
        }
        constants = {(names.index(name),): value for name, value in values.items()}
        source = ASTSource(fn=_psi_kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        assert compiled.asm["cubin"], flags


@triton.jit
def _closed_forms_kernel(
    inputs, hyper, outputs, FIRST: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr
):
    """The kernel's closed forms on one group per program: the inputs of
    ``conftest.CLOSED_FORM_INPUTS``, the outputs of ``conftest.closed_form_outputs``."""
    group = tl.program_id(0)
    row = inputs + 8 * group
    xx = tl.load(row)
    norm = _gradient_norm(xx, tl.load(row + 1), tl.load(row + 2))
    e_x, e_u, e_b, shift, c_u, c_b, growth = _step_coefficients(
        xx,
        tl.load(row + 1),
        xx * norm,
        tl.load(row + 3),
        tl.load(row + 4),
        tl.load(row + 5),
        tl.load(hyper),
        tl.load(hyper + 1),
        FIRST,
        NESTEROV,
    )
    second, moment, rate = _adam_step_size(
        tl.load(row + 6),
        tl.load(row + 7),
        norm,
        tl.load(hyper + 2),
        tl.load(hyper + 3),
        tl.load(hyper + 4),
        tl.load(hyper + 5),
        tl.load(hyper + 6),
        tl.load(hyper + 7),
        AMSGRAD,
    )
    out = outputs + 11 * group
    tl.store(out, norm)
    tl.store(out + 1, e_x)
    tl.store(out + 2, e_u)
    tl.store(out + 3, e_b)
    tl.store(out + 4, shift)
    tl.store(out + 5, c_u)
    tl.store(out + 6, c_b)
    tl.store(out + 7, growth)
    tl.store(out + 8, second)
    tl.store(out + 9, moment)
    tl.store(out + 10, rate)


@kernel_test
@pytest.mark.parametrize("adam", ADAM_CASES[1:])
@pytest.mark.parametrize(
    "case", CLOSED_FORM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_kernel_closed_forms_are_the_closed_forms(case, adam):
    """The kernel's coefficients are those of :mod:`psi_geoopt.optim._closed_form` (compiled
    by Triton from the same source), on random float64 inputs against NumPy's."""
    inputs = closed_form_inputs(seed=2)
    groups = len(inputs["xx"])
    table = numpy.stack([inputs[name] for name in CLOSED_FORM_INPUTS], axis=1)
    beta1, beta2, eps, step, amsgrad = adam
    lr, _, _, *adam_hyper = adam_hyper_parameters(0.01, (beta1, beta2), eps, step)
    hyper = torch.tensor([case["momentum"], case["keep"], lr, *adam_hyper], dtype=torch.float64)
    outputs = torch.zeros(groups, 11, dtype=torch.float64, device=DEVICE)
    _closed_forms_kernel[(groups,)](
        torch.from_numpy(table).to(DEVICE),
        hyper.to(DEVICE),
        outputs,
        FIRST=case["first"],
        NESTEROV=case["nesterov"],
        AMSGRAD=amsgrad,
    )
    forms = {
        f.__name__: specialize(f, numpy) for f in (gradient_norm, step_coefficients, adam_step_size)
    }
    expected = closed_form_outputs(forms, inputs, case, adam)
    for index, values in enumerate(expected):
        numpy.testing.assert_allclose(
            outputs[:, index].cpu().numpy(), values, rtol=1e-10, err_msg=str(index)
        )


@pytest.fixture
def kernel(monkeypatch):
    """The PSI tensors of the fast paths go through the kernel (in the interpreter: on CPU);
    yields the list of launches (SGD: its ``first`` flag, Adam: ``"adam"``), and fails a
    test whose steps never launch it."""
    from psi_geoopt.optim.kernels import triton as triton_step

    launches = []
    if INTERPRETED:
        monkeypatch.setattr(
            _fused, "_takes_kernel", lambda point, size: size <= triton_step.MAX_ROW
        )
    sgd_step, adam_step = triton_step.psi_sgd_step, triton_step.psi_adam_step

    def counted_sgd(*args, **kwargs):
        launches.append(kwargs["first"])
        return sgd_step(*args, **kwargs)

    def counted_adam(*args, **kwargs):
        launches.append("adam")
        return adam_step(*args, **kwargs)

    monkeypatch.setattr(triton_step, "psi_sgd_step", counted_sgd)
    monkeypatch.setattr(triton_step, "psi_adam_step", counted_adam)
    yield launches
    assert launches, "the kernel was never launched"


def on_device(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        p.data = p.data.to(DEVICE)
    return params


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_kernel_follows_reference(kernel, dtype, config):
    """Several steps, the first (fresh buffers) included, of every parameter kind mixed in one
    group: the PSI tensors on the kernel, the rest on their usual paths. The gradients are new
    tensors at every step, so the address table is rebuilt."""
    fast_params = on_device(make_params(dtype))
    reference_params = on_device(make_params(dtype))
    fast = run(fast_params, steps=STEPS, **config)
    reference = run(reference_params, steps=STEPS, foreach=False, **config)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    assert kernel.count(True) == (config["momentum"] != 0)  # one first step with momentum


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_kernel_half_precision_close_to_reference(kernel, nesterov, dtype):
    """bfloat16 and float16 tensors, computed in float32 and rounded once per step."""
    fast_params = on_device(make_params(dtype))
    reference_params = on_device(make_params(dtype))
    fast = run(fast_params, steps=STEPS, momentum=0.9, nesterov=nesterov)
    reference = run(reference_params, steps=STEPS, foreach=False, momentum=0.9, nesterov=nesterov)
    assert_same_trajectory(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


@kernel_test
def test_kernel_follows_a_learning_rate_schedule_with_gradients_in_place(kernel):
    """The learning rate changes at every step (a new hyper-parameter table each time) while
    the gradients are written in place (the address table is reused)."""
    trajectories = []
    for foreach in (None, False):
        params = on_device(make_params(torch.float64))
        optimizer = RiemannianSGD(params, lr=0.1, momentum=0.9, foreach=foreach)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        generator = torch.Generator().manual_seed(0)
        for p in params[:-1]:
            p.grad = torch.zeros_like(p)
        for _ in range(STEPS):
            for p in params[:-1]:
                p.grad.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
            optimizer.step()
            scheduler.step()
        trajectories.append((optimizer, params))
    (fast, fast_params), (reference, reference_params) = trajectories
    assert_same_trajectory(fast, reference, fast_params, reference_params, 1e-12)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_adam_kernel_follows_geoopt_loop(kernel, dtype, config):
    """Adam: the PSI tensors grouped along axis 0 on the kernel, against geoopt's loop; the
    moments are compared too (``exp_avg_sq`` broadcast over each group)."""
    fast_params = on_device(make_params(dtype))
    reference_params = on_device(make_params(dtype))
    fast = run_adam(fast_params, steps=STEPS, **config)
    reference = run_adam(reference_params, steps=STEPS, foreach=False, **config)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])
    assert kernel.count("adam") == STEPS


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_kernel_half_precision_close_to_geoopt_loop(kernel, dtype):
    fast_params = on_device(make_params(dtype))
    reference_params = on_device(make_params(dtype))
    fast = run_adam(fast_params, steps=STEPS, amsgrad=True)
    reference = run_adam(reference_params, steps=STEPS, amsgrad=True, foreach=False)
    assert_same_adam_state(fast, reference, fast_params, reference_params, TOLERANCE[dtype])


@kernel_test
def test_kernel_marks_what_it_writes_as_modified(kernel):
    """A backward through a graph that saved a weight before the step fails, as after any
    in-place update by PyTorch, instead of silently using the new values."""
    params = on_device(make_params(torch.float32))
    weight = params[0]
    loss = (weight.square() * torch.arange(weight.numel(), device=DEVICE).view_as(weight)).sum()
    optimizer = RiemannianSGD([weight], lr=0.1, momentum=0.9)
    loss.backward(retain_graph=True)
    version = weight._version
    optimizer.step()
    assert weight._version > version
    assert optimizer.state[weight]["momentum_buffer"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
