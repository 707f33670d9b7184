"""Long-context evaluation tasks, generated from a seed (no downloads), as torch tensors.

* `listops`: LRA ListOps (Tay et al., 2021): nested MIN/MAX/MED/SM over digits, classify
  the value 0..9. `listops_dataset(split, ...) -> (tokens [N, L], lengths [N], labels [N])`.
* `mqar`: Zoology's multi-query associative recall (Arora et al., 2023): key-value pairs,
  then queries of the keys. `mqar_dataset(n, ...) -> (inputs [N, L], labels [N, L])`.
* `passkey`: Landmark Attention's passkey retrieval (Mohtashami & Jaggi, 2023) as bytes.
  `passkey_batch(n, length, ...) -> (tokens [N, L], answer_start, answer [N, D], key_positions [N])`.

Each module's docstring cites the original generator it follows and lists the deviations.
Every generator takes `seed`: an int, or a `torch.Generator` (advanced by one draw).
"""

from .listops import (
    LISTOPS_OPERATORS,
    LISTOPS_SPLIT_SIZES,
    LISTOPS_VOCAB,
    ListOpsData,
    ListOpsTree,
    ListOpsVocab,
    evaluate_listops,
    generate_listops_tree,
    listops_dataset,
    listops_source,
    listops_stream_marks,
    listops_tokens,
)
from .mqar import MQAR_IGNORE_INDEX, MQARData, mqar_dataset, mqar_vocab_ranges
from .passkey import (
    PASSKEY_VOCAB_SIZE,
    PasskeyBatch,
    PasskeyExample,
    decode_bytes,
    encode_bytes,
    passkey_batch,
    passkey_example,
    passkey_min_length,
)

__all__ = [
    "LISTOPS_OPERATORS",
    "LISTOPS_SPLIT_SIZES",
    "LISTOPS_VOCAB",
    "MQAR_IGNORE_INDEX",
    "PASSKEY_VOCAB_SIZE",
    "ListOpsData",
    "ListOpsTree",
    "ListOpsVocab",
    "MQARData",
    "PasskeyBatch",
    "PasskeyExample",
    "decode_bytes",
    "encode_bytes",
    "evaluate_listops",
    "generate_listops_tree",
    "listops_dataset",
    "listops_source",
    "listops_stream_marks",
    "listops_tokens",
    "mqar_dataset",
    "mqar_vocab_ranges",
    "passkey_batch",
    "passkey_example",
    "passkey_min_length",
]
