"""Training small causal LMs on byte tokens (corpus.py: generated / stdlib / file text;
lm.py: the loop, checkpoints, loss curves). Used by `sparse-attn train`,
examples/train_lm.py and the evaluation tasks that need a trained model."""

from .corpus import TokenData, load_corpus, stdlib_corpus, synthetic_corpus
from .parallel import ContextParallel
from .lm import TrainConfig, TrainResult, evaluate, load_checkpoint, lr_at, plot_loss_curves, train_lm

__all__ = ["ContextParallel", "TokenData", "TrainConfig", "TrainResult", "evaluate", "load_checkpoint", "load_corpus", "lr_at",
           "plot_loss_curves", "stdlib_corpus", "synthetic_corpus", "train_lm"]
