"""Training with each sequence split over ranks (context parallelism) and, optionally, the batch
split over data-parallel groups: a 2-D `DeviceMesh` ("dp", "cp"), or a 1-D one (context only).

    mesh = init_device_mesh("cuda", (world // P, P), mesh_dim_names=("dp", "cp"))
    model, result = train_lm(model_cfg, cfg, data, parallel=ContextParallel(mesh))

Every rank of the world takes rows `dp_rank::dp` of the step's batch and positions
`sharding.positions(cp_rank)` of each row; the loss each rank back-propagates is its share of
the global mean (its tokens' sum over all tokens of the batch), and weight gradients are summed
over the whole (flattened dp x cp) world before clipping, so a step equals the single-process
step on the whole batch (to float rounding: tested on CPU with gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import Sharding, choose_sharding, parallelize_context, zigzag
from ..distributed.module import _pattern_of

__all__ = ["ContextParallel"]


class ContextParallel:
    """How `train_lm` splits its work over `mesh` (dims "dp" and "cp", or a 1-D mesh of context
    ranks). `sharding`: the split of every sequence (None: the one `choose_sharding` picks for
    the model's layers when they all agree, else head-tail, which balances causal layers)."""

    def __init__(self, mesh, sharding: Sharding | None = None, *, scheme: str = "auto") -> None:
        names = mesh.mesh_dim_names or ()
        if mesh.ndim == 1:
            self.cp_group, self.dp_group = mesh.get_group(), None
        elif mesh.ndim == 2 and set(names) == {"dp", "cp"}:
            self.cp_group, self.dp_group = mesh.get_group("cp"), mesh.get_group("dp")
        else:
            raise ValueError(f"mesh must be 1-D (context ranks) or 2-D with dims ('dp', 'cp'), got {mesh.ndim}-D "
                             f"with dims {names}")
        if sharding is not None and not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        self.mesh, self.sharding, self.scheme = mesh, sharding, scheme
        self.cp_rank, self.cp_size = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self.dp_size = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1

    @property
    def is_main(self) -> bool:
        """The one rank that prints and writes files."""
        return dist.get_rank() == 0

    def parallelize(self, model, seq_len: int, batch_size: int, block: int):
        """Splits every attention layer of `model` over the context ranks (in place)."""
        if batch_size % self.dp_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the data-parallel size ({self.dp_size})")
        if self.sharding is None:
            candidates = set()
            for mechanism in model.cfg.layer_mechanisms():
                pattern = _pattern_of(mechanism)
                layout = pattern.layout(seq_len, block_q=block)
                candidates.add(choose_sharding(pattern, layout, seq_len, self.cp_size, block))
            self.sharding = candidates.pop() if len(candidates) == 1 else zigzag(seq_len, self.cp_size, block)
        if self.sharding.num_tokens != seq_len or self.sharding.world_size != self.cp_size:
            raise ValueError(f"sharding is for {self.sharding.num_tokens} tokens over {self.sharding.world_size} "
                             f"ranks; training needs {seq_len} over {self.cp_size}")
        return parallelize_context(model, self.cp_group, self.sharding, scheme=self.scheme)

    def local(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's part of a batch: rows dp_rank::dp, positions of cp_rank. [B / dp, N_r] each."""
        rows = slice(self.dp_rank, None, self.dp_size)
        return (self.sharding.shard(x[rows], self.cp_rank, dim=1), self.sharding.shard(y[rows], self.cp_rank, dim=1))

    def share(self, local_sum: torch.Tensor, count: int) -> torch.Tensor:
        """A local loss sum as this rank's share of the global mean over `count` tokens."""
        return local_sum / count

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the world (a reported loss)."""
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def reduce_gradients(self, model) -> None:
        """Weight gradients summed over the world: context ranks hold partial sums of the same
        replicated weights, data-parallel groups their batch rows' shares. One flat all-reduce."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
