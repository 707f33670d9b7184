"""Training (loop.py: the one training loop every trainer uses, with checkpoint/resume and a time
budget; corpus.py: generated / stdlib / file text; lm.py: small causal LMs on byte tokens, loss
curves). Used by `sparse-attn train`, examples/train_lm.py and the evaluation tasks that need a
trained model (passkey, MQAR, ListOps)."""

from .corpus import TokenData, load_corpus, stdlib_corpus, synthetic_corpus
from .parallel import ContextParallel
from .lm import TrainConfig, TrainResult, evaluate, load_checkpoint, lr_at, plot_loss_curves, train_lm
from .loop import (LoopResult, TrainLoop, adamw, autocast, optimizer_step, read_checkpoint, warmup_cosine,
                   write_checkpoint)

__all__ = ["ContextParallel", "LoopResult", "TokenData", "TrainConfig", "TrainLoop", "TrainResult", "adamw", "autocast",
           "evaluate", "load_checkpoint", "load_corpus", "lr_at", "optimizer_step", "plot_loss_curves",
           "read_checkpoint", "stdlib_corpus", "synthetic_corpus", "train_lm", "warmup_cosine", "write_checkpoint"]
