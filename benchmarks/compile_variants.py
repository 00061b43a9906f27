"""Which compiled form of the PSI step is fastest on a device? An experiment, not a product.

Times, interleaved in one process (median over rounds), the optimizer step on ResNet parameter
shapes (convolutions on PSI, the rest Euclidean, momentum 0.9) of ``torch.optim.SGD(foreach)``,
the eager fast path, and the compiled PSI step under four inductor settings: default, combo
kernels (horizontal fusion across tensors), CUDA graphs (parameters and momentum buffers marked
as static addresses), and both. Each variant's iterates are checked against the reference loop.

    python benchmarks/compile_variants.py [cuda|cpu] [resnet18|resnet50] [ROUNDS]

On CPU the CUDA-graph variants are skipped and only the first six convolutions are used. On
CUDA the shipped step is the Triton kernel of ``psi_geoopt.optim.kernels.triton``; this
experiment, which led to it, forces :func:`torch.compile` there instead.
"""

from __future__ import annotations

import statistics
import sys
import time

import geoopt
import torch
import torch._dynamo

import psi_geoopt.optim as psi_optim
from psi_geoopt import PSIManifold
from psi_geoopt.experiments.bench import MODELS
from psi_geoopt.optim import _fused
from psi_geoopt.optim.kernels import compiled

VARIANTS = {
    "compiled (default)": ({}, False),
    "compiled + combo_kernels": ({"combo_kernels": True}, False),
    "compiled + cudagraphs (static views)": ({"triton.cudagraphs": True}, True),
    "compiled + combo + cudagraphs": ({"combo_kernels": True, "triton.cudagraphs": True}, True),
}


def main(device: str, model: str, rounds: int) -> None:
    convolutions, others = MODELS[model]
    if device == "cpu":
        convolutions, others = convolutions[:6], others[:6]
    variants = {k: v for k, v in VARIANTS.items() if device != "cpu" or "cudagraphs" not in k}

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def parameters(psi: bool) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        params: list[torch.Tensor] = []
        for shape in convolutions:
            weight = torch.randn(shape, generator=generator).to(device)
            params.append(
                geoopt.ManifoldParameter(weight, manifold=PSIManifold())
                if psi
                else torch.nn.Parameter(weight)
            )
        params += [
            torch.nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in others
        ]
        gradients = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = (1e-2 * torch.randn(p.shape, generator=gradients)).to(device)
        return params

    def compiled_step(tag: str, options: dict, static: bool):
        namespace: dict = {}
        source = "def steps(*args, **kwargs):\n    return po._psi_fused_steps(*args, **kwargs)\n"
        exec(compile(source, f"<{tag}>", "exec"), {"po": compiled}, namespace)  # own code object
        function = torch.compile(namespace["steps"], dynamic=False, options=options)
        views: dict = {}

        def run(entries, *, lr, **hyper) -> None:
            xs = []
            for point, buffer, size in entries:
                if static and point not in views:
                    views[point] = point.detach().view(-1, size)
                    torch._dynamo.mark_static_address(views[point])
                    torch._dynamo.mark_static_address(buffer)
                xs.append(views[point] if static else point.detach().view(-1, size))
            function(
                xs,
                [p.grad.reshape(-1, size) for p, _, size in entries],
                [b.view(-1, size) for _, b, size in entries],
                lr=torch.tensor(lr, device=device),
                **hyper,
            )

        return run

    reference = parameters(True)
    reference_optimizer = psi_optim.RiemannianSGD(reference, lr=0.01, momentum=0.9, foreach=False)
    sgd = torch.optim.SGD(parameters(False), lr=0.01, momentum=0.9, foreach=True)
    eager = psi_optim.RiemannianSGD(parameters(True), lr=0.01, momentum=0.9, compile=False)
    actions = {"torch SGD foreach": sgd.step, "PSI eager fast path": eager.step}
    trained = {}
    for name, (options, static) in variants.items():
        params = parameters(True)
        optimizer = psi_optim.RiemannianSGD(params, lr=0.01, momentum=0.9, compile=True)
        replacement = compiled_step(name, options, static)

        def step(optimizer=optimizer, replacement=replacement) -> None:
            originals = compiled.psi_sgd, _fused._takes_kernel
            compiled.psi_sgd = replacement
            _fused._takes_kernel = lambda point, group_size: False  # torch.compile on CUDA
            try:
                optimizer.step()
            finally:
                compiled.psi_sgd, _fused._takes_kernel = originals

        start = time.perf_counter()
        for _ in range(4):
            step()
        synchronize()
        print(f"{name}: warm-up (compilation) {time.perf_counter() - start:.1f} s", flush=True)
        actions[name], trained[name] = step, params
    for _ in range(4):
        reference_optimizer.step()
    for name, params in trained.items():
        gap = max(
            float((a.detach() - b.detach()).norm() / b.detach().norm())
            for a, b in zip(params, reference, strict=True)
        )
        print(f"{name}: relative gap to the reference loop after 4 steps {gap:.1e}")
    samples: dict[str, list[float]] = {k: [] for k in actions}
    for _ in range(rounds):
        for name, action in actions.items():
            synchronize()
            start = time.perf_counter()
            action()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    baseline = statistics.median(samples["torch SGD foreach"])
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{model} shapes on {device} ({where}), torch {torch.__version__}, {rounds} rounds")
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"  {name:<40} {1e3 * median:8.3f} ms  x{median / baseline:5.2f}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(
        arguments[0] if arguments else "cuda",
        arguments[1] if len(arguments) > 1 else "resnet50",
        int(arguments[2]) if len(arguments) > 2 else 30,
    )
