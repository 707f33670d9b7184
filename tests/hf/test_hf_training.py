"""sparse_attn.hf in training and under torch.compile: a compiled model equals transformers'
own attention and stops compiling after a few lengths (no recompile per length), gradient
checkpointing changes nothing, and `Trainer` on packed sequences (`DataCollatorWithFlattening`:
one row, position_ids restarting per document, no attention_mask) takes the same steps as on
transformers' eager attention, each document as if alone."""

import pytest

pytest.importorskip("transformers.masking_utils")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from tiny_hf import VOCAB, WINDOW, assert_close, build, labels_at_real_positions, left_padded  # noqa: E402

import sparse_attn.hf as H  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402


# ------------------------------------------------------------------------------ compile
def counting_backend(inner: str = "eager"):
    """A torch.compile backend that counts the graphs dynamo hands it (`.graphs`) and how often
    compiled graphs run (`.runs`: a model that fell back to eager runs none). A function, not
    an object: transformers' CompileConfig deep-copies its backend (a function is kept as is)."""
    compile_inner = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        backend.graphs += 1
        compiled = compile_inner(gm, example_inputs)

        def run(*args):
            backend.runs += 1
            return compiled(*args)

        return run

    backend.graphs = backend.runs = 0
    return backend


# graph-break reasons (first line) of calls behind torch.compiler.disable; the second: ops.sparse
# makes its disabled wrapper on first use, inside the first traced call
DELIBERATE = {"Skip calling `torch.compiler.disable()`d function", "Attempted to call function marked as skipped"}


@pytest.fixture
def dynamo():
    """A clean dynamo; recompile_limit 16 (transformers >= 5.2x wraps several forwards in one
    deprecate_kwarg code object: compiled frame by frame around the graph breaks they pass the
    default 8) and a hard failure when a limit is hit, so that nothing silently runs eagerly."""
    torch._dynamo.reset()
    counters.clear()
    patch = dict(recompile_limit=16)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    with torch._dynamo.config.patch(**patch):
        yield
    torch._dynamo.reset()


def _batch(n, padded, seed):
    """Three rows of n tokens: left-padded to different lengths, or all real."""
    ids, mask = left_padded([n, n - 9, n - 3] if padded else [n] * 3, seed=seed)
    return ids, mask, labels_at_real_positions(ids, mask)


# (length, padded): both kinds of batch (padded rows run per row and eagerly; an unpadded causal
# batch may be traced into the graph) at a few lengths each, enough for dynamo's automatic
# dynamic shapes to settle; then new lengths must compile nothing.
WARMUP = [(23, True), (30, True), (41, False), (52, False), (37, False)]
NEW = [(60, True), (45, False), (19, True), (26, False)]


def test_compiled_model_equals_eager_attention_and_does_not_recompile_per_length(dynamo):
    """torch.compile(model), training step (loss.backward()): logits, loss and
    gradients equal the same weights on transformers' eager attention, uncompiled."""
    ref = build("llama").train()
    model = H.enable(build("llama")).train()
    backend = counting_backend()
    compiled = torch.compile(model, backend=backend)
    for step, (n, padded) in enumerate(WARMUP + NEW):
        if step == len(WARMUP):
            graphs_after_warmup = backend.graphs
        ids, mask, labels = _batch(n, padded, seed=step)
        backend.runs = 0
        model.zero_grad()
        ref.zero_grad()
        out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        expected.loss.backward()
        assert backend.runs > 0, f"length {n}: no compiled graph ran"
        real = mask.bool()
        assert_close(out.logits[real].detach(), expected.logits[real].detach(), what=f"logits at length {n}")
        assert_close(out.loss.detach(), expected.loss.detach(), what=f"loss at length {n}")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, what=f"grad {name} at length {n}")
    assert backend.graphs == graphs_after_warmup, \
        f"{backend.graphs - graphs_after_warmup} graphs compiled for the lengths {[n for n, _ in NEW]} after warm-up"
    assert graphs_after_warmup <= 64, graphs_after_warmup


def test_compiled_forward_with_a_schedule_equals_uncompiled_and_does_not_recompile_per_length(dynamo):
    """model.forward = torch.compile(model.forward) with a streaming schedule (the blocked
    backend: it runs eagerly inside the compiled model), inference: logits equal the same model
    uncompiled, and the schedule is in effect (they differ from the model's own attention)."""
    schedule = P.streaming(4, 8)
    ref = H.enable(build("llama"), schedule)
    own = build("llama")
    model = H.enable(build("llama"), schedule)
    backend = counting_backend()
    model.forward = torch.compile(model.forward, backend=backend)
    warmup = [(23, True), (30, True), (41, False)]  # every attention call runs eagerly: two lengths settle it
    with torch.no_grad():
        for step, (n, padded) in enumerate(warmup + [(60, True), (45, False)]):
            if step == len(warmup):
                graphs_after_warmup = backend.graphs
            ids, mask, _ = _batch(n, padded, seed=step)
            backend.runs = 0
            out = model(input_ids=ids, attention_mask=mask).logits
            assert backend.runs > 0, f"length {n}: no compiled graph ran"
            real = mask.bool()
            assert_close(out[real], ref(input_ids=ids, attention_mask=mask).logits[real], what=f"length {n}")
            assert float((out[real] - own(input_ids=ids, attention_mask=mask).logits[real]).abs().max()) > 1e-3
    assert backend.graphs == graphs_after_warmup, f"{backend.graphs - graphs_after_warmup} graphs after warm-up"
    # the graph breaks are the deliberate ones: the mask function and the per-row / blocked
    # attention behind torch.compiler.disable (not dynamo giving up inside sparse_attn's code)
    reasons = {reason.split("\n")[0] for reason in counters["graph_break"]}
    assert reasons <= DELIBERATE, reasons - DELIBERATE


def test_generate_compiled_by_transformers_with_a_static_cache_equals_the_models_own(dynamo):
    """generate(cache_implementation="static", compile_config=...): transformers compiles the
    decoding step itself (on CPU only when asked: `_compile_all_devices`)."""
    from transformers.generation.configuration_utils import CompileConfig

    model = build("mistral")
    ids, mask = left_padded([17, 3, 11], seed=5)
    kw = dict(max_new_tokens=WINDOW + 2, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(input_ids=ids, attention_mask=mask, **kw)
    H.enable(model)
    backend = counting_backend()
    config = CompileConfig(backend=backend, mode=None)
    config._compile_all_devices = True
    out = model.generate(input_ids=ids, attention_mask=mask, compile_config=config, **kw)
    assert backend.graphs > 0 and backend.runs > 0, "generate did not run the compiled forward"
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_inductor_compiled_model_equals_eager_attention(dynamo):
    """The default backend (inductor: C++ code generation, ~1 min on CPU)."""
    ref = build("gemma3")
    model = H.enable(build("gemma3"))
    compiled = torch.compile(model)
    with torch.no_grad():
        for step, (n, padded) in enumerate([(23, True), (30, True), (41, False), (19, True)]):
            ids, mask, _ = _batch(n, padded, seed=step)
            real = mask.bool()
            assert_close(compiled(input_ids=ids, attention_mask=mask).logits[real],
                         ref(input_ids=ids, attention_mask=mask).logits[real], what=f"length {n}")


# -------------------------------------------------------------------- gradient checkpointing
def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _checkpointing_enable(model, **kwargs):
    """model.gradient_checkpointing_enable (renamed activation_checkpointing_enable in 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def _count_attention_calls(model) -> list:
    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name, reentrant", [("llama", True), ("llama", False), ("gpt_oss", True),
                                             ("gemma3", False)])
def test_gradient_checkpointing_equals_no_checkpointing_and_eager_attention(name, reentrant):
    ids, mask, labels = _batch(23, True, seed=3)
    eager_loss, eager_grads = _loss_and_grads(build(name).train(), ids, mask, labels)
    plain = H.enable(build(name)).train()
    loss, grads = _loss_and_grads(plain, ids, mask, labels)
    model = H.enable(build(name)).train()
    _checkpointing_enable(model, use_reentrant=reentrant)
    calls = _count_attention_calls(model)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, ids, mask, labels)
    layers = len(model.model.layers)
    assert calls[0] == 2 * layers, f"{calls[0]} attention calls for {layers} layers: checkpointing did not recompute"
    assert eager_grads.keys() == grads.keys() == ckpt_grads.keys()
    assert_close(ckpt_loss, loss, what="loss, checkpointed")
    assert_close(loss, eager_loss, what="loss")
    for n in eager_grads:
        assert_close(ckpt_grads[n], grads[n], what=f"grad {n}, checkpointed")
        assert_close(grads[n], eager_grads[n], what=f"grad {n}")


def test_gradient_checkpointing_with_a_schedule_equals_no_checkpointing():
    ids, mask, labels = _batch(23, True, seed=4)
    schedule = P.streaming(4, 8)
    loss, grads = _loss_and_grads(H.enable(build("llama"), schedule).train(), ids, mask, labels)
    model = H.enable(build("llama"), schedule).train()
    _checkpointing_enable(model)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, ids, mask, labels)
    _, own_grads = _loss_and_grads(build("llama").train(), ids, mask, labels)
    assert max(float((grads[n] - own_grads[n]).abs().max()) for n in grads) > 1e-3  # the schedule is in effect
    assert_close(ckpt_loss, loss, what="loss")
    for n in grads:
        assert_close(ckpt_grads[n], grads[n], what=f"grad {n}")


# ------------------------------------------------------------------------- packed sequences
def _documents(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (int(n),), generator=g).tolist()} for n in lengths]


def _token_loss_sum(logits, ids):
    """Summed next-token cross-entropy of one document (logits (n, V), ids (n,))."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum")


@pytest.mark.parametrize("name, schedule", [("llama", None), ("mistral", None), ("gemma3", None),
                                            ("llama", P.streaming(4, 8))], ids=["llama", "mistral", "gemma3",
                                                                               "llama-streaming"])
def test_packed_loss_and_gradients_equal_the_documents_alone(name, schedule):
    """One packed row (the flattening collator's batch, no cache) against each document run
    alone (no packing, no mask): the summed token loss and its gradients."""
    lengths = [9, 4, 15, 2]
    batch = tf.DataCollatorWithFlattening()(_documents(lengths))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    model = H.enable(build(name), schedule).train()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    ids = batch["input_ids"][0]
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    packed = sum(_token_loss_sum(logits[a:b], ids[a:b]) for a, b in zip(starts, starts[1:]))
    model.zero_grad()
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = sum(_token_loss_sum(model(input_ids=ids[None, a:b]).logits[0], ids[a:b])
                for a, b in zip(starts, starts[1:]))
    alone.backward()
    assert_close(packed.detach(), alone.detach(), what="summed loss")
    for n, p in model.named_parameters():
        if n in packed_grads:
            assert_close(packed_grads[n], p.grad, what=f"grad {n}")


def test_gpt_oss_packed_sequences_follow_its_own_mask_and_refuse_flash_boundaries():
    """GPT-OSS builds its masks without position_ids (transformers 5.17 to 5.24): its own eager
    attention does not keep packed documents apart, and sparse_attn (the model's own attention)
    does the same; but handed the collator's flash kwargs (cu_seq_lens_k) it refuses to drop the
    boundaries they give, where eager attention silently ignores them."""
    docs = _documents([9, 4, 15])
    batch = tf.DataCollatorWithFlattening()(docs)
    model = build("gpt_oss")
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
        alone = model(input_ids=torch.tensor([docs[1]["input_ids"]])).logits
        H.enable(model)
        out = model(**batch, use_cache=False).logits
    assert_close(out, expected)
    separated = float((expected[0, 9:13] - alone[0]).abs().max()) < 1e-5
    flash = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(docs)
    if separated:  # a transformers that passes position_ids to GPT-OSS's masks
        with torch.no_grad():
            assert_close(model(**flash, use_cache=False).logits, expected)
    else:
        with pytest.raises(ValueError, match="cu_seq_lens_k"), torch.no_grad():
            model(**flash, use_cache=False)


class _LossRecorder(tf.Trainer):
    """Records every step's loss unrounded (log_history rounds it) and the batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.batches = [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches.append(dict(inputs))
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        self.losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def _checkpointing_args() -> dict:
    """TrainingArguments' gradient checkpointing (renamed activation_checkpointing in transformers 5.2x)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(tf.TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def _train(model, tmp_path, collator, steps=4, **args):
    data = _documents(torch.randint(2, 20, (3 * steps,), generator=torch.Generator().manual_seed(1)).tolist(), seed=2)
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=3,
                                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                                logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, **args)
    trainer = _LossRecorder(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return trainer


def _row_masks(model) -> list:
    """The RowMask each forward hands the first attention layer."""
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    return seen


@pytest.mark.parametrize("name, collator, args", [
    ("llama", {}, {}),
    ("mistral", {"return_flash_attn_kwargs": True}, {}),
    ("qwen2", {}, _checkpointing_args()),
], ids=["llama", "mistral-flash_kwargs", "qwen2-gradient_checkpointing"])
def test_trainer_on_packed_sequences_equals_eager_attention(name, collator, args, tmp_path):
    """Trainer + DataCollatorWithFlattening: the same per-step losses and final weights as the
    same run on transformers' eager attention (which masks the documents apart itself)."""
    expected = _train(build(name), tmp_path / "eager", tf.DataCollatorWithFlattening(**collator), **args)
    model = H.enable(build(name))
    masks = _row_masks(model)
    trainer = _train(model, tmp_path / "sparse_attn", tf.DataCollatorWithFlattening(**collator), **args)
    for batch in trainer.batches:  # really packed: one row, restarting positions, no padding mask
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert ("cu_seq_lens_k" in batch) == bool(collator)
    assert all(m is not None and m.document_ids is not None and int(m.document_ids.max()) == 2 for m in masks)
    assert len(trainer.losses) == 4
    assert len(masks) == 4 * (2 if args else 1)  # checkpointing: each layer runs again in the backward
    for step, (a, e) in enumerate(zip(trainer.losses, expected.losses)):
        assert abs(a - e) <= 1e-5 * max(1.0, abs(e)), f"step {step}: loss {a} vs eager {e}"
    # the weights after 4 AdamW steps: AdamW divides by the gradients' running RMS, which lifts
    # their rounding differences (1e-8) for near-zero gradients; 1e-4 of lr * steps = 4e-2
    for (n, p), q in zip(model.named_parameters(), expected.model.parameters()):
        assert_close(p.detach(), q.detach(), tol=1e-4, what=f"trained weight {n}")


@pytest.mark.slow
def test_trainer_compiled_on_packed_sequences_equals_eager_attention(tmp_path, dynamo):
    """TrainingArguments(torch_compile=True) (accelerate compiles the model; dynamo only, the
    "eager" backend): the same per-step losses as eager attention uncompiled."""
    expected = _train(build("llama"), tmp_path / "eager", tf.DataCollatorWithFlattening(), steps=5)
    counters.clear()
    trainer = _train(H.enable(build("llama")), tmp_path / "compiled", tf.DataCollatorWithFlattening(), steps=5,
                     torch_compile=True, torch_compile_backend="eager")
    assert counters["stats"]["unique_graphs"] > 0, "the Trainer did not compile the model"
    assert len(trainer.losses) == 5
    for step, (a, e) in enumerate(zip(trainer.losses, expected.losses)):
        assert abs(a - e) <= 1e-5 * max(1.0, abs(e)), f"step {step}: loss {a} vs eager {e}"
