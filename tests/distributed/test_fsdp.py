"""FSDP2 (`fully_shard`) over the context group, as the README advises for sharded weights: with
the gradient divide factor at 1 the sharded gradients are the sums of the ranks' partial sums,
equal to the whole model's (float64); with FSDP's default (the mean over its ranks) they come
out scaled by 1/P, which is why the advice sets it."""

from __future__ import annotations

import pytest
import torch
from gloo_pool import pool

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # torch < 2.6: fully_shard lived in torch.distributed._composable
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)

_MESH = {}


def fsdp_case(rank, world_size, divide_by_one):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sparse_attn.distributed import parallelize_context, zigzag
    from sparse_attn.nn import ModelConfig, SparseCausalLM

    if "cp" not in _MESH:  # one mesh per worker process (the pool keeps its processes)
        _MESH["cp"] = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    mesh = _MESH["cp"]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      mechanisms=["sliding_window:window=24", "causal"])
    model = SparseCausalLM(cfg).double()
    length = 128
    tokens = torch.randint(0, 32, (2, length + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    want = [g.clone() for g in torch.autograd.grad(loss, list(model.parameters()))]
    sharding = zigzag(length, world_size, 32)
    parallelize_context(model, mesh["cp"], sharding)
    fully_shard(model, mesh=mesh)
    if divide_by_one:
        model.set_gradient_divide_factor(1.0)
    logits = model(sharding.shard(inputs, rank, dim=1))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), sharding.shard(targets, rank, dim=1).flatten(),
                                      reduction="sum").backward()
    ratios = [float((p.grad.full_tensor() * w).sum() / (w * w).sum()) for p, w in zip(model.parameters(), want)]
    errors = [float((p.grad.full_tensor() - w).abs().max() / w.abs().max()) for p, w in zip(model.parameters(), want)]
    dist.barrier()
    return min(ratios), max(ratios), max(errors)


def test_fully_shard_over_the_context_group_sums_gradients_with_divide_factor_one():
    for low, high, error in pool(2).run(fsdp_case, True):
        assert error < 1e-12 and abs(low - 1) < 1e-12 and abs(high - 1) < 1e-12


def test_fully_shard_default_averages_gradients_over_the_context_ranks():
    for low, high, _ in pool(2).run(fsdp_case, False):
        assert abs(low - 0.5) < 1e-12 and abs(high - 0.5) < 1e-12  # 1/P of the true gradient
