"""Train a small byte-level language model whose layers use sparse attention, plot its loss and
print a sample: the whole library path in one page (data -> ModelConfig -> train_lm -> generate).

    PYTHONPATH=src python3 examples/train_lm.py                          # CPU: a few minutes
    PYTHONPATH=src python3 examples/train_lm.py --mechanisms linear:causal=true
    PYTHONPATH=src python3 examples/train_lm.py --mechanisms sliding_window:window=32 causal causal \\
        sliding_window:window=32                                         # one spec per layer
    PYTHONPATH=src python3 examples/train_lm.py --device cuda --steps 2000   # on the GPU machine

Stop it at any time and add --resume to continue from the checkpoint (train_loss.pt by default);
the resumed run ends exactly where an uninterrupted one would. Writes train_loss.png (needs
matplotlib). The corpus is generated: records whose header facts (a secret code, a pet's name)
come back hundreds of bytes later, so mechanisms that see far (dense, global tokens, linear
state) can beat a short window on them.
"""

import argparse

import torch

from sparse_attn.nn import ModelConfig
from sparse_attn.train import (
    TokenData,
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
parser.add_argument("--checkpoint", default="train_loss.pt")
parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
args = parser.parse_args()

# 1. Data: ~1 MB of generated text, byte tokens (vocab 256), the last 10% for validation.
gpu = args.device.startswith("cuda")
data = TokenData.from_bytes(synthetic_corpus(8_000_000 if gpu else 1_000_000, seed=0))

# 2. Model: four pre-norm blocks; `mechanisms` is one spec for all layers or a list, one per layer.
model_cfg = ModelConfig(vocab_size=256, dim=256 if gpu else 128, num_layers=4, num_heads=4,
                        mechanisms=args.mechanisms[0] if len(args.mechanisms) == 1 else args.mechanisms)

# 3. Training: AdamW, warm-up then cosine decay; validation loss every eval_every steps.
cfg = TrainConfig(seq_len=1024 if gpu else 256, batch_size=32 if gpu else 8, steps=args.steps,
                  eval_every=max(1, args.steps // 10), device=args.device,
                  dtype="bfloat16" if gpu else "float32")
model, result = train_lm(model_cfg, cfg, data, checkpoint=args.checkpoint, resume=args.resume)
print(f"val loss {result.final_val_loss:.3f} nats/byte after {cfg.steps} steps "
      f"({result.num_parameters:,} parameters, {result.seconds:.0f} s); checkpoint: {args.checkpoint}")
plot_loss_curves({str(args.mechanisms): result.history}, "train_loss.png", title="byte-level LM")

# 4. Sample: continue the start of the validation text. caches="auto" keeps, per layer, only
#    what its mechanism can see (a window ring, globals + window, a linear state, ...).
prompt = data.val[:128].long()[None].to(args.device)  # [1, 128]
model.eval()
out = model.generate(prompt, 300, caches="auto", temperature=0.8,
                     generator=torch.Generator(args.device).manual_seed(0))
print(bytes(prompt[0].tolist()).decode(errors="replace"))
print("--- generated ---")
print(bytes(out[0, 128:].tolist()).decode(errors="replace"))
