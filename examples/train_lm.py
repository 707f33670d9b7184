"""Train a small byte-level language model whose layers use sparse attention, plot its loss and
print a sample: the whole library path in one page (data -> ModelConfig -> train_lm -> generate).

    PYTHONPATH=src python3 examples/train_lm.py                          # CPU: a few minutes
    PYTHONPATH=src python3 examples/train_lm.py --mechanisms linear:causal=true
    PYTHONPATH=src python3 examples/train_lm.py --mechanisms sliding_window:window=32 causal causal \\
        sliding_window:window=32                                         # one spec per layer
    PYTHONPATH=src python3 examples/train_lm.py --device cuda --steps 2000   # on the GPU machine
    PYTHONPATH=src torchrun --nproc-per-node 2 examples/train_lm.py --context-parallel 2   # CPU, gloo
    PYTHONPATH=src torchrun --nproc-per-node 8 examples/train_lm.py --context-parallel 4 --device cuda \
        --seq-len 131072 --batch-size 2                  # each sequence over 4 GPUs, 2 data-parallel groups

With --context-parallel P (under torchrun, P dividing the world size) each sequence is split over
P ranks (only the keys each layer's pattern needs move between them) and the batch over the
world / P data-parallel groups, on a 2-D DeviceMesh ("dp", "cp"); weight gradients are summed over
the whole world, so every step equals the single-process step (the losses agree to float
rounding: tests/distributed/test_train_context_parallel.py). For FSDP instead of replicated
weights, shard over the flattened mesh (`fully_shard(model, mesh=mesh._flatten())`), which then
does that reduction. No checkpoint and no sample in this mode (decoding with caches is
single-process).

--history PATH writes the loss per step as JSON, --summary PATH the settings, final validation
loss, seconds, and peak memory and bytes sent per rank (benchmarks/cp_gpu2.sh compares runs with
them). Stop it at any time and add --resume to continue from the checkpoint (train_loss.pt by default);
the resumed run ends exactly where an uninterrupted one would. Writes train_loss.png (needs
matplotlib). The corpus is generated: records whose header facts (a secret code, a pet's name)
come back hundreds of bytes later, so mechanisms that see far (dense, global tokens, linear
state) can beat a short window on them.
"""

import argparse
import json
import os

import torch

from sparse_attn.nn import ModelConfig
from sparse_attn.train import (
    TokenData,
    ContextParallel,
    TrainConfig,
    plot_loss_curves,
    synthetic_corpus,
    train_lm,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--mechanisms", nargs="+", default=["longformer:window=32,global_tokens=4,causal=true"],
                    help="one spec for every layer, or one per layer (4 layers)")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--checkpoint", default="train_loss.pt", help="'' for none")
parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
parser.add_argument("--seq-len", type=int, default=None, help="default: 1024 on CUDA, 256 on CPU")
parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
parser.add_argument("--context-parallel", type=int, default=0, metavar="P",
                    help="split each sequence over P ranks (run under torchrun; P divides the world size)")
parser.add_argument("--plot", default="train_loss.png", help="loss curve file ('' for none)")
parser.add_argument("--sample", type=int, default=300, help="bytes to generate at the end (0: none)")
parser.add_argument("--history", default="", help="write the loss history here as JSON")
parser.add_argument("--summary", default="", help="write a JSON summary here: settings, final val loss, seconds, "
                                                   "peak memory and bytes sent per rank")
args = parser.parse_args()

# 0. Context parallel: a ("dp", "cp") mesh over the torchrun world.
parallel, main = None, True
if args.context_parallel:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0 or world % args.context_parallel:
        raise SystemExit(f"--context-parallel {args.context_parallel} needs torchrun with a world size it divides "
                         f"(WORLD_SIZE={world or 'unset'})")
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (world // args.context_parallel, args.context_parallel),
                            mesh_dim_names=("dp", "cp"))
    parallel, main = ContextParallel(mesh), dist.get_rank() == 0
    args.checkpoint, args.sample = None, 0

# 1. Data: ~1 MB of generated text (8 MB on CUDA; more when the validation split, the last 10%,
#    would not hold one sequence), byte tokens (vocab 256).
gpu = args.device.startswith("cuda")
if gpu:
    torch.cuda.reset_peak_memory_stats()
seq_len = args.seq_len or (1024 if gpu else 256)
data = TokenData.from_bytes(synthetic_corpus(max(8_000_000 if gpu else 1_000_000, 12 * (seq_len + 2)), seed=0))

# 2. Model: four pre-norm blocks; `mechanisms` is one spec for all layers or a list, one per layer.
model_cfg = ModelConfig(vocab_size=256, dim=256 if gpu else 128, num_layers=4, num_heads=4,
                        mechanisms=args.mechanisms[0] if len(args.mechanisms) == 1 else args.mechanisms)

# 3. Training: AdamW, warm-up then cosine decay; validation loss every eval_every steps.
cfg = TrainConfig(seq_len=seq_len, batch_size=args.batch_size or (32 if gpu else 8),
                  steps=args.steps, eval_every=max(1, args.steps // 10), device=args.device,
                  dtype="bfloat16" if gpu else "float32")
model, result = train_lm(model_cfg, cfg, data, checkpoint=args.checkpoint or None, resume=args.resume,
                         show_progress=main, parallel=parallel)
if main:
    print(f"val loss {result.final_val_loss:.3f} nats/byte after {cfg.steps} steps "
          f"({result.num_parameters:,} parameters, {result.seconds:.0f} s); checkpoint: {args.checkpoint}")
    if args.plot:
        plot_loss_curves({str(args.mechanisms): result.history}, args.plot, title="byte-level LM")
    if args.history:
        with open(args.history, "w") as f:
            json.dump(result.history, f)
mine = [torch.cuda.max_memory_allocated() if gpu else 0,
        model.context_comm.stats.total() if parallel is not None else 0]
ranks = [mine]
if parallel is not None:
    print(f"rank {dist.get_rank()}: sent {model.context_comm.stats.total('kv', 'dkv'):,} bytes of k/v and dK/dV")
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    dist.destroy_process_group()
if main and args.summary:
    with open(args.summary, "w") as f:
        json.dump({"args": vars(args), "world_size": len(ranks), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                   "tokens_per_step": cfg.seq_len * cfg.batch_size, "dtype": cfg.dtype,
                   "num_parameters": result.num_parameters, "final_val_loss": result.final_val_loss,
                   "seconds": result.seconds, "peak_memory_bytes": [m for m, _ in ranks],
                   "bytes_sent": [b for _, b in ranks]}, f, indent=2)

# 4. Sample: continue the start of the validation text. caches="auto" keeps, per layer, only
#    what its mechanism can see (a window ring, globals + window, a linear state, ...).
if args.sample:
    prompt = data.val[:128].long()[None].to(args.device)  # [1, 128]
    model.eval()
    out = model.generate(prompt, args.sample, caches="auto", temperature=0.8,
                         generator=torch.Generator(args.device).manual_seed(0))
    print(bytes(prompt[0].tolist()).decode(errors="replace"))
    print("--- generated ---")
    print(bytes(out[0, 128:].tolist()).decode(errors="replace"))
