"""`enable` / `disable`: switch a loaded transformers model to sparse_attn and back, with an
optional per-layer schedule stored on its attention modules."""

from __future__ import annotations

from typing import Sequence

from .._extras import MissingExtra
from ..ops import Mechanism
from ..ops.common import eager_under_compile
from ..ops.mechanisms import PATTERN
from ..patterns import BlockLayout, Pattern
from .attention import MECHANISM_ATTR, attention_forward
from .mask import NAME, row_mask

_PREVIOUS_ATTR = "_sparse_attn_previous"  # on the model: the implementation enable() replaced


def _transformers():
    """transformers' two registries, or a MissingExtra naming the `hf` extra."""
    try:
        import transformers
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise MissingExtra("sparse_attn.hf needs transformers >= 5.17 with AttentionInterface and "
                           f"masking_utils.AttentionMaskInterface: pip install 'sparse_attn[hf]' ({exc})") from None
    if not hasattr(PreTrainedModel, "set_attn_implementation"):
        raise MissingExtra(f"sparse_attn.hf needs transformers >= 5.17 (PreTrainedModel.set_attn_implementation); "
                           f"found {transformers.__version__}: pip install -U 'sparse_attn[hf]'")
    return AttentionInterface, AttentionMaskInterface, PreTrainedModel


def register() -> str:
    """Register the attention and the mask function under one name (both: with only the
    attention function, transformers would hand it mask=None and drop the padding). Returns
    the name, "sparse_attn", usable as `attn_implementation=` in `from_pretrained`."""
    attention_interface, mask_interface, _ = _transformers()
    attention_interface.register(NAME, attention_forward)
    # row_mask runs eagerly under torch.compile (one graph break per mask): it reads the 2-D
    # padding mask and the model's predicate on the CPU (Python per row); traced, dynamo broke
    # the graph at every data-dependent step and gave up on the function anyway
    mask_interface.register(NAME, eager_under_compile(row_mask))
    return NAME


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    text = config.get_text_config()
    if text is not config:
        raise ValueError(f"model: {type(model).__name__} is a composite model (its text config is a sub-config); "
                         "enable sparse_attn on its language model (e.g. model.model.language_model), whose masks "
                         "and layers are the ones sparse_attn describes")
    return config


def attention_layers(model) -> dict[int, list]:
    """The attention modules of `model` by layer index (modules named *Attention with an int
    `layer_idx`, as every transformers decoder has), checked to cover each layer once."""
    config = _text_config(model)
    layers: dict[int, list] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and type(module).__name__.endswith("Attention"):
            layers.setdefault(idx, []).append(module)
    count = getattr(config, "num_hidden_layers", None)
    if not layers or (isinstance(count, int) and sorted(layers) != list(range(count))):
        raise ValueError(f"model: expected attention modules (*Attention with layer_idx) for layers 0..{count}-1 in "
                         f"{type(model).__name__}, found layers {sorted(layers)}")
    return dict(sorted(layers.items()))


def _entry(i: int, item, causal: bool, model_name: str):
    """One schedule entry as what the attention function reads: None, a Pattern, or a non-pattern
    Mechanism; refused when it cannot run on the layer."""
    where = f"schedule[{i}]"
    if item is None:
        return None
    if isinstance(item, BlockLayout):
        raise TypeError(f"{where}: a BlockLayout has one geometry; pass its Pattern (each call has its own lengths)")
    if isinstance(item, str):
        item = Mechanism.parse(item)  # ValueError naming an unknown name or parameter
    if isinstance(item, Mechanism) and item.kind == PATTERN:
        item = item.pattern()
    if isinstance(item, Pattern):
        if causal and not item.is_causal():
            raise ValueError(f"{where}: {item!r} is not causal (Pattern.is_causal() is False) but layer {i} of "
                             f"{model_name} is: its tokens would read later tokens. Use the causal form (causal=True, "
                             "or `& P.causal()`)")
        return item
    if isinstance(item, Mechanism):
        params = item.info.parameters()
        if "generator" in params and not any(item.params.get(key) is not None for key in ("generator", "seed",
                                                                                          "features")):
            raise ValueError(f"{where}: {item} draws new random features / hashes at every call without a seed: the "
                             "model would change between calls (and a cached generate would not match); pass "
                             f"generator=<int seed>, e.g. '{item},generator=0'")
        if causal:
            default = item.info.parameters().get("causal")
            is_causal = item.params.get("causal", getattr(default, "default", False))
            if is_causal is not True:
                raise ValueError(f"{where}: {item} is not causal (pass causal=true) but layer {i} of {model_name} is")
            if item.info.leaky:  # the registry entry says what reads later positions
                raise ValueError(f"{where}: {item.name} with causal=True still chooses its keys using later positions "
                                 f"({item.info.leaky}), so a causal LM would read the future through it; refused "
                                 "for causal layers")
        return item
    raise TypeError(f"{where} must be None, a Pattern, a Mechanism or a spec string like "
                    f"'streaming:sinks=4,window=1020', got {type(item).__name__}")


def _resolve(schedule, layers: dict[int, list], model_name: str) -> list:
    count = len(layers)
    if schedule is None or isinstance(schedule, (Pattern, Mechanism, str, BlockLayout)):
        items = [schedule] * count
    elif isinstance(schedule, Sequence):
        items = list(schedule)
        if len(items) != count:
            raise ValueError(f"schedule has {len(items)} entries but {model_name} has {count} attention layers: give "
                             "one mechanism for every layer, or one per layer (None keeps a layer as it is)")
    else:
        raise TypeError(f"schedule must be None, a Pattern, a Mechanism, a spec string or a list of them (one per "
                        f"layer), got {type(schedule).__name__}")
    out = []
    for i, item in enumerate(items):
        causal = all(getattr(m, "is_causal", True) for m in layers[i])
        out.append(_entry(i, item, causal, model_name))
    return out


def _implementations(model, pretrained) -> dict[str, str]:
    return {name or "model": sub.config._attn_implementation for name, sub in model.named_modules()
            if isinstance(sub, pretrained)}


def _refuse_unsupported(config, model_name: str) -> None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"model: {model_name} caps attention scores with tanh (attn_logit_softcapping="
                         f"{config.attn_logit_softcapping}, Gemma2), which sparse_attn does not compute")
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(f"model: {model_name} uses chunked attention (attention_chunk_size="
                         f"{config.attention_chunk_size}, Llama4), which sparse_attn does not describe yet")


def enable(model, schedule=None):
    """Switch a loaded transformers model to sparse_attn; returns the model.

    schedule: None (every layer computes exactly what it computed before: its own causal or
    sliding-window mask, padding, packing and cache offsets included), one mechanism for every
    layer (a `Pattern`, a `Mechanism`, or a spec string such as "streaming:sinks=4,window=1020"),
    or a list with one per layer (None keeps that layer). Entries are stored on the attention
    modules (`module.sparse_attn_mechanism`). Causal layers refuse non-causal patterns and
    mechanisms; models with attention softcapping or chunked attention are refused.
    The switch is checked (transformers only logs a warning when a model cannot switch)."""
    _, _, pretrained = _transformers()
    if not isinstance(model, pretrained):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = _text_config(model)
    name = type(model).__name__
    _refuse_unsupported(config, name)
    layers = attention_layers(model)
    entries = _resolve(schedule, layers, name)
    register()
    previous = getattr(model, _PREVIOUS_ATTR, None) or config._attn_implementation
    model.set_attn_implementation(NAME)
    now = _implementations(model, pretrained)
    if any(impl != NAME for impl in now.values()):
        model.set_attn_implementation(previous)
        raise ValueError(f"model: {name} did not switch to {NAME!r} (attention implementations now {now}); it may not "
                         "route attention through transformers' AttentionInterface")
    setattr(model, _PREVIOUS_ATTR, previous)
    for i, modules in layers.items():
        for module in modules:
            setattr(module, MECHANISM_ATTR, entries[i])
    return model


def disable(model):
    """Restore the attention implementation `enable` replaced and drop the schedule; returns the model."""
    _, _, pretrained = _transformers()
    previous = getattr(model, _PREVIOUS_ATTR, None)
    if previous is None:
        raise ValueError(f"model: {type(model).__name__} was not switched by sparse_attn.hf.enable")
    model.set_attn_implementation(previous)
    now = _implementations(model, pretrained)
    if any(impl != previous for impl in now.values()):
        raise ValueError(f"model: {type(model).__name__} did not switch back to {previous!r} (now {now})")
    for modules in attention_layers(model).values():
        for module in modules:
            if hasattr(module, MECHANISM_ATTR):
                delattr(module, MECHANISM_ATTR)
    delattr(model, _PREVIOUS_ATTR)
    return model


def schedule_of(model) -> list:
    """The schedule entry of each layer (None: the model's own attention)."""
    return [getattr(modules[0], MECHANISM_ATTR, None) for modules in attention_layers(model).values()]
