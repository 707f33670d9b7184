"""Train a SparseCausalLM with its sequence split over ranks (context parallelism).

    torchrun --nproc-per-node 2 examples/train_lm_context_parallel.py --context-parallel 2          # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_lm_context_parallel.py --context-parallel 4 --device cuda \\
        --seq-len 131072                                       # 2 data-parallel groups x 4 context ranks

The world is a 2-D mesh ("dp", "cp"): each "cp" group shares one batch of sequences, each rank
holding its shard of every sequence (the sharding the planner picks: contiguous for windows,
head-tail for causal); only the keys the pattern needs move between them. Weight gradients are
all-reduced over the whole world (the flattened dp x cp mesh); with FSDP, shard over that
flattened mesh (`fully_shard(model, mesh=mesh._flatten())`) in the same way.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from sparse_attn.distributed import choose_sharding, parallelize_context
from sparse_attn.nn import ModelConfig, SparseCausalLM
from sparse_attn.train import TokenData, synthetic_corpus

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--context-parallel", type=int, required=True, help="ranks per sequence (divides the world)")
parser.add_argument("--mechanism", default="sliding_window:window=256")
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

world = int(os.environ["WORLD_SIZE"])
if world % args.context_parallel:
    raise SystemExit(f"--context-parallel {args.context_parallel} must divide the world size {world}")
device_type = "cuda" if args.device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
mesh = init_device_mesh(device_type, (world // args.context_parallel, args.context_parallel),
                        mesh_dim_names=("dp", "cp"))
cp_rank, dp_rank = mesh["cp"].get_local_rank(), mesh["dp"].get_local_rank()
device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")

torch.manual_seed(0)  # the same initial weights on every rank
cfg = ModelConfig(vocab_size=256, dim=128, num_layers=2, num_heads=4, mechanisms=args.mechanism)
model = SparseCausalLM(cfg).to(device)
pattern = model.blocks[0].attn.mechanism.pattern()
layout = pattern.layout(args.seq_len, block_q=128, device=device)
sharding = choose_sharding(pattern, layout, args.seq_len, args.context_parallel, 128)
parallelize_context(model, mesh["cp"], sharding)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

data = TokenData.from_bytes(synthetic_corpus(2_000_000, seed=0)).train
gen = torch.Generator().manual_seed(dp_rank)  # each data-parallel group reads its own sequences
for step in range(args.steps):
    start = torch.randint(0, data.numel() - args.seq_len - 1, (1,), generator=gen).item()
    chunk = data[start:start + args.seq_len + 1].long()[None].to(device)  # [1, N + 1]
    inputs = sharding.shard(chunk[:, :-1], cp_rank, dim=1)  # this rank's tokens [1, N_r]
    targets = sharding.shard(chunk[:, 1:], cp_rank, dim=1)
    logits = model(inputs)  # [1, N_r, vocab]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    opt.zero_grad()
    loss.backward()
    for p in model.parameters():  # sum over the flattened dp x cp mesh, mean over tokens
        dist.all_reduce(p.grad)
        p.grad /= args.seq_len * (world // args.context_parallel)
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh["cp"].get_group())
    if dist.get_rank() == 0:
        print(f"step {step}: loss {total.item() / args.seq_len:.3f} nats/byte; k/v bytes sent by rank 0 so far "
              f"{model.context_comm.stats.total('kv'):,}")
dist.destroy_process_group()
