"""A small language model run whole and with its sequence sharded over the ranks (for the
1-D context group and the 2-D Ulysses x cp mesh tests alike)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def parallel_lm_error(group, sharding, index: int, length: int):
    """(max |difference|, the parallelized model): a 2-layer float64 `SparseCausalLM` (a window
    layer and a causal layer) on `length` tokens, whole, against the same weights wrapped by
    `parallelize_context(model, group, sharding)` with this rank holding shard `index`: the
    shard's logits, and the weight gradients summed over the world (replicated weights: each
    rank's are partial sums)."""
    from sparse_attn.distributed import parallelize_context
    from sparse_attn.nn import ModelConfig, SparseCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      mechanisms=["sliding_window:window=24", "causal"])
    model = SparseCausalLM(cfg).double()
    tokens = torch.randint(0, 32, (2, length + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [2, length]
    full_logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(full_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    full_grads = torch.autograd.grad(loss, list(model.parameters()))
    parallelize_context(model, group, sharding)
    logits = model(sharding.shard(inputs, index, dim=1))  # [2, n_r, vocab]
    local_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sharding.shard(targets, index, dim=1).flatten(),
                                                   reduction="sum")
    grads = torch.autograd.grad(local_loss, list(model.parameters()))
    errs = [(logits - sharding.shard(full_logits, index, dim=1)).abs().max().item()]
    for g, want in zip(grads, full_grads):
        g = g.clone()
        dist.all_reduce(g)
        errs.append((g - want).abs().max().item())
    return max(errs), model
