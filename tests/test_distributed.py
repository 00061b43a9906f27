"""Multi-process training with PSI parameters: DDP, and FSDP2 sharding along axis 0 with
RiemannianSGD and RiemannianAdam.

Two CPU processes, gloo backend on 127.0.0.1. Each rank trains a BatchNorm ConvNet whose
convolution weights are PSI parameters on its own half of every batch; the result must be the
same on both ranks and equal to one process that averages the two halves' gradients.
"""

from __future__ import annotations

import datetime
import functools
import socket
import sys
import time

import geoopt
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import needs_tested_torch
from torch import nn

from psi_geoopt import to_psi
from psi_geoopt.optim import RiemannianAdam, RiemannianSGD

WORLD_SIZE = 2
STEPS = 4
BATCH = 16
TIMEOUT_S = 150  # a guard against hangs, generous for loaded machines
PSI_WEIGHTS = ("0.weight", "3.weight", "6.weight")
OPTIMIZERS = {
    "sgd": (RiemannianSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (RiemannianAdam, dict(lr=0.05, weight_decay=1e-3, amsgrad=True)),
}
"""The optimizers trained on the ranks, with their options."""

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)"
    ),
    needs_tested_torch("DDP and FSDP2 (FSDP2 fails inside fully_shard's hooks on torch 2.6)"),
]


def build_model() -> nn.Module:
    """Conv → BN → ReLU three times, pooling, Linear, converted with :func:`to_psi`."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 5, 3, padding=1, bias=False),  # 5 groups: uneven shards on 2 ranks
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 1, 1, bias=False),  # 1 group: rank 1 holds no row of it
        nn.BatchNorm2d(1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1, 3),
    ).double()
    converted = to_psi(model, batch(0)[0])
    assert {name: m.dim for name, m in converted.items()} == dict.fromkeys(PSI_WEIGHTS, 0)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(BATCH, 1, 6, 6, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 3, (BATCH,), generator=generator)


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor.chunk(WORLD_SIZE)[rank]


def loss_of(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    images, labels = batch(step)
    return nn.functional.cross_entropy(model(shard(images, rank)), shard(labels, rank))


def make_optimizer(kind: str, params, **options) -> torch.optim.Optimizer:
    optimizer_class, hyper = OPTIMIZERS[kind]
    return optimizer_class(params, **hyper, **options)


def train_ddp(rank: int) -> dict:
    model = nn.parallel.DistributedDataParallel(build_model())
    optimizer = make_optimizer("sgd", model.parameters())
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, step, rank).backward()
        optimizer.step()
    return {
        "weights": {name: p.detach() for name, p in model.module.named_parameters()},
        "kinds": {name: type(p).__name__ for name, p in model.module.named_parameters()},
    }


def train_fsdp2(rank: int, kind: str, foreach: bool | None, attach: bool = True) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    manifolds = {
        name: p.manifold
        for name, p in model.named_parameters()
        if isinstance(p, geoopt.ManifoldParameter)
    }
    fully_shard(model)
    for name, p in model.named_parameters():
        if attach and name in manifolds:  # fully_shard replaced the ManifoldParameter
            p.manifold = manifolds[name]
    optimizer = make_optimizer(kind, model.parameters(), foreach=foreach)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, step, rank).backward()
        optimizer.step()
    return {
        "weights": {name: p.detach().full_tensor() for name, p in model.named_parameters()},
        "local_rows": {name: p.to_local().shape[0] for name, p in model.named_parameters()},
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    """DDP, then FSDP2 with the fast path and with the reference loop of each optimizer, in one
    process group."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        results = {"ddp": train_ddp(rank)}
        for kind in OPTIMIZERS:
            results[f"fsdp2-{kind}"] = train_fsdp2(rank, kind, foreach=None)
            results[f"fsdp2-{kind}-reference"] = train_fsdp2(rank, kind, foreach=False)
        results["fsdp2-unmarked"] = train_fsdp2(rank, "sgd", foreach=None, attach=False)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run :func:`worker` on 2 processes; fail (and kill them) after ``TIMEOUT_S`` seconds."""
    out_dir = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(
        worker,
        args=(free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@functools.cache
def single_process_reference(kind: str) -> dict[str, torch.Tensor]:
    """One model; each step, the average of the two halves' gradients (BatchNorm statistics
    per half, as on the ranks)."""
    model = build_model()
    optimizer = make_optimizer(kind, model.parameters())
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD_SIZE):
            model.zero_grad(set_to_none=True)
            loss_of(model, step, rank).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *per_rank in zip(model.parameters(), *grads, strict=True):
            p.grad = sum(per_rank) / WORLD_SIZE
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_matches_reference(weights: dict[str, torch.Tensor], kind: str) -> None:
    reference = single_process_reference(kind)
    initial = dict(build_model().named_parameters())
    assert weights.keys() == reference.keys()
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name], expected, rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.allclose(expected, initial[name].detach()), f"{name} did not move"


def test_ddp_ranks_agree_and_match_averaged_gradients(ranks):
    rank0, rank1 = (r["ddp"] for r in ranks)
    assert rank0["kinds"]["0.weight"] == "ManifoldParameter"
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    assert_matches_reference(rank0["weights"], "sgd")


@pytest.mark.parametrize("path", ["", "-reference"], ids=["fast-path", "reference-loop"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_fsdp2_shards_along_groups_and_matches_averaged_gradients(ranks, kind, path):
    rank0, rank1 = (r[f"fsdp2-{kind}{path}"] for r in ranks)
    # axis 0 is sharded: 8 groups as 4 + 4, 5 groups as 3 + 2 (each group on one rank)
    assert (rank0["local_rows"]["0.weight"], rank1["local_rows"]["0.weight"]) == (4, 4)
    assert (rank0["local_rows"]["3.weight"], rank1["local_rows"]["3.weight"]) == (3, 2)
    assert (rank0["local_rows"]["6.weight"], rank1["local_rows"]["6.weight"]) == (1, 0)
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    assert_matches_reference(rank0["weights"], kind)


def test_fsdp2_without_the_manifold_attribute_trains_euclidean(ranks):
    """fully_shard drops the ManifoldParameter class: unmarked, the weights are plain."""
    weights = ranks[0]["fsdp2-unmarked"]["weights"]
    reference = single_process_reference("sgd")
    assert not torch.allclose(weights["0.weight"], reference["0.weight"])
    initial = build_model()[0].weight.detach()
    assert not torch.allclose(
        weights["0.weight"].flatten(1).norm(dim=1), initial.flatten(1).norm(dim=1)
    )
