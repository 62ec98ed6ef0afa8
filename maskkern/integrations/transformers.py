"""Hugging Face transformers on maskkern, through transformers' public registries only.

One call::

    import maskkern.integrations.transformers as mkt

    model = AutoModelForCausalLM.from_pretrained(...)   # or from_config(...)
    mkt.apply(model)            # attention, loss, fused linear + cross-entropy head, PadEmbedding
    ...train as usual (Trainer or a plain loop)...
    mkt.unapply(model)          # back to what it was

or only the attention, for any model that uses ``AttentionInterface``::

    mkt.register()              # "maskkern", the attention *and* its mask function
    model = AutoModelForCausalLM.from_config(config, attn_implementation="maskkern")

What changes, per model instance (never a module's globals, never a class attribute):

- ``attention``: ``model.set_attn_implementation("maskkern")``. ``register`` adds two entries under
  one name: ``AttentionMaskInterface`` gets ``maskkern_mask`` and ``AttentionInterface`` gets
  ``maskkern_attention``. Both are needed: transformers hands an attention whose name has no mask
  function ``attention_mask=None``, and it would silently attend to the padding;
  ``maskkern_attention`` refuses to run in that state. ``apply`` also gives the instance a
  ``create_masks_for_generate`` (the hook ``generate()`` looks up on the model) under which the mask
  entry builds full tensors: for compileable (static) caches ``generate()`` builds the masks before
  the forward, and the forward passes them back through ``create_*_mask``, which keeps only tensors.
- ``loss``: ``model.loss_function`` = maskkern's ``ForCausalLMLoss``, ``ForMaskedLMLoss`` or
  ``ForSequenceClassificationLoss`` (the single-label case; regression and multi-label stay
  transformers'), same arguments (``num_items_in_batch``, ``shift_labels``, ``ignore_index``) on
  ``mk.masked_cross_entropy``, without transformers' fp32 copy of the logits (and without its
  downcast of fp64 ones).
- ``linear_cross_entropy``: for the causal LMs whose head is a plain ``nn.Linear`` on the last hidden
  state (``LINEAR_CROSS_ENTROPY_MODELS``), the instance's ``forward`` (a ``types.MethodType`` in the
  instance's ``__dict__``; deleting it restores the class's) runs, when training with ``labels``
  (keyword or positional, bound as the original forward binds them), the base model and
  ``mk.linear_cross_entropy`` on the head's weight: the (N, V) logits are never built and come back
  ``None`` (with ``return_dict=False`` the tuple keeps that ``None`` second, where transformers has
  the logits). Inference, and training without labels, call the original forward.
- ``pad_embedding``: when the config has a pad token, the input embedding becomes
  ``mk.nn.PadEmbedding`` holding the same ``Parameter`` (tied heads stay tied; state_dict unchanged).

What the mask function hands the attention — the cheapest description that is exact:

==================================================  =================================================
transformers asked for                              the attention gets (a ``MaskkernMask``)
==================================================  =================================================
causal / bidirectional, padding or not              key padding as a (B, 1, 1, Lk) bool view of the
                                                    2-D mask (None without one), ``causal`` True or
                                                    False
the same with a KV cache (decoding, prefill)        ``causal="bottom_right"`` when the queries end at
                                                    the last key (DynamicCache, sliding or not)
sliding window w (Mistral, Qwen2 sliding layers)    ``window=(w - 1, 0)`` with ``causal``
packed sequences (position_ids restarting, no       ``packed``: ``mk.varlen_attention`` over
2-D mask, no cache: DataCollatorWithFlattening)     ``cu_seq_lens_q/k`` when given, else the
                                                    cu_seqlens of the position_ids (cu_seq_lens_q
                                                    are honoured with a cache too; position_ids
                                                    alone, as transformers has it, are not)
packed bidirectional rows (Bert; no 2-D mask)       with ``cu_seq_lens_q/k`` in the attention's
                                                    kwargs (DataCollatorWithFlattening(
                                                    return_flash_attn_kwargs=True)): varlen, not
                                                    causal. position_ids alone reach neither the
                                                    attention nor transformers' bidirectional mask:
                                                    the row is one sequence, as with sdpa
anything else (prefix-LM and other overlays,        the full (B, 1, Lq, Lk) bool ``sdpa_mask``
chunked attention, StaticCache offsets, masks       (a plain tensor)
``generate()`` builds ahead of the forward, ...)
==================================================  =================================================

The pattern is read from what transformers passes the mask function (the identity of its plain
mask functions, ``local_size`` against the config's ``sliding_window``, ``use_vmap`` and
``allow_is_causal_skip``, which every overlay turns off), never from the mask's values: there is no
data-dependent branch, so ``torch.compile(fullgraph=True)`` traces it with no graph break. One case
is told apart by that alone and not exactly: a packed batch of a multimodal model with bidirectional
image blocks (``block_sequence_ids``) and no 2-D mask would lose its blocks; no text model has them.

Unsupported features raise NotImplementedError naming them: logit softcapping, attention sinks,
position biases, attention dropout > 0 (training with a dropout in the config).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import PadEmbedding
from ..ops import attention, linear_cross_entropy, masked_cross_entropy, varlen_attention

NAME = "maskkern"

# maskkern's backend for the attention and the losses: None = the device's default. A setting of
# this module (tests run it on "torch", the reference, as well).
BACKEND: str | None = None

# Model types (config.model_type) whose *ForCausalLM / *LMHeadModel apply their output embedding, a
# plain nn.Linear, to the base model's last hidden state with nothing in between (no logit scaling
# or softcapping): the fused head computes exactly their loss. Tested on each.
LINEAR_CROSS_ENTROPY_MODELS = frozenset({"llama", "mistral", "qwen2", "gpt2"})

_BUILTIN_NAMES = frozenset(
    {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}
)


class _Absent:
    """The sentinel for "not in the instance's __dict__"; copies and pickles as itself (a deep copy
    of an applied model must still recognise it)."""

    def __reduce__(self) -> str:
        return "_ABSENT"


_ABSENT = _Absent()
_STATE = "_maskkern_state"

# True while generate() builds masks ahead of the forward (apply's create_masks_for_generate): the
# mask entry then returns full tensors. A module global, not thread-local: another thread building
# a mask meanwhile gets the full one, which is exact too, and compiled code reads it with a guard.
_FULL_MASKS = False


_TF: types.SimpleNamespace | None = None


def _transformers() -> types.SimpleNamespace:
    """The transformers modules this adapter uses (looked up once: register and apply do it before
    any compiled forward reads them); a clear ImportError when it is missing."""
    global _TF
    if _TF is not None:
        return _TF
    try:
        import transformers
        from transformers import masking_utils, modeling_outputs, modeling_utils
        from transformers.loss import loss_utils
    except ImportError as exc:
        raise ImportError(
            "maskkern.integrations.transformers needs Hugging Face transformers 5.x "
            "(pip install 'transformers>=5.24'); it could not be imported: " + str(exc)
        ) from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(
            f"maskkern.integrations.transformers needs transformers 5.x, found {transformers.__version__}"
        )
    _TF = types.SimpleNamespace(
        transformers=transformers,
        masking_utils=masking_utils,
        outputs=modeling_outputs,
        modeling_utils=modeling_utils,
        loss_utils=loss_utils,
    )
    return _TF


# --- the mask function --------------------------------------------------------------------------


class MaskkernMask(NamedTuple):
    """What ``maskkern_mask`` hands ``maskkern_attention`` in place of a (B, 1, Lq, Lk) mask."""

    keys: Tensor | None  # (B, 1, 1, Lk) bool, True = a key to attend to; None = every key
    causal: bool | str  # False, True (top-left) or "bottom_right" (the queries end at the last key)
    window: tuple[int, int] | None  # (left, right) around the causal diagonal; None = unbounded
    packed: bool  # sequences packed along each row: attention within each one only

    @property
    def ndim(self) -> int:
        # transformers reads .ndim of a mask handed back to create_*_mask: only a mask generate()
        # built ahead of the forward is, and apply() makes those full tensors.
        raise AttributeError(
            "a maskkern mask description was passed back to transformers' create_*_mask: generate() "
            "with a compileable (static) cache builds the masks ahead of the forward, which needs "
            "tensors. Call maskkern.integrations.transformers.apply(model) (it makes those masks full "
            "tensors) rather than register() alone, or generate with a dynamic cache."
        )


def maskkern_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int | Tensor = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    config=None,
    **kwargs: Any,
) -> MaskkernMask | Tensor:
    """The ``AttentionMaskInterface`` entry: called by transformers' ``create_*_mask`` with the
    arguments of ``masking_utils.sdpa_mask``. Returns a ``MaskkernMask`` (see the module's table) or,
    where nothing cheaper is exact, the full bool mask ``sdpa_mask`` builds."""
    mu = _transformers().masking_utils
    if mask_function is None:
        mask_function = mu.causal_mask_function

    def full() -> Tensor:
        return mu.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=False,
            **{**kwargs, "allow_is_bidirectional_skip": False},
            use_vmap=use_vmap,
            config=config,
        )

    if _FULL_MASKS:
        return full()  # built ahead of the forward by generate(): a tensor (see _FULL_MASKS)
    if isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor):
        return full()  # StaticCache: a tensor offset and unfilled slots, only the full mask is exact
    # Query i is key index i + shift: causal is top-left at 0, bottom-right when the queries end at
    # the last key; anything else (e.g. a cache with room left) is not a flag.
    shift = q_offset - kv_offset
    causal = True if shift == 0 else "bottom_right" if shift == kv_length - q_length else None
    keys = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        keys = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)[:, None, None, :]

    if mask_function is mu.bidirectional_mask_function:
        return MaskkernMask(keys, False, None, False)
    if causal is None:
        return full()
    if mask_function is mu.causal_mask_function:
        return MaskkernMask(keys, causal, None, False)
    # A closure: transformers' sliding window (and_masks of its overlay and causal), or a packed
    # batch, or an overlay. Overlays set use_vmap (or/and_mask_function) or are not an and_mask
    # (block overlays); bidirectional creators pass allow_is_bidirectional_skip.
    if (
        use_vmap
        or "allow_is_bidirectional_skip" in kwargs
        or getattr(mask_function, "__name__", "") != "and_mask"
    ):
        return full()
    sliding = getattr(config, "sliding_window", None)
    if local_size is not None and (
        local_size != sliding or getattr(config, "attention_chunk_size", None) is not None
    ):
        return full()  # chunked attention, or a local size the config does not explain
    window = None if local_size is None else (local_size - 1, 0)
    if allow_is_causal_skip:
        # Every deviation from the plain (sliding) causal mask turns the skip off.
        return full() if window is None else MaskkernMask(keys, causal, window, False)
    # The skip is off and there is no 2-D mask and no cache: the packed-sequence mask (each
    # sequence causal within itself, the rows restarting where position_ids do).
    if attention_mask is None and shift == 0 and kv_offset == 0 and kv_length == q_length:
        return MaskkernMask(None, True, window, True)
    return full()


# --- the attention function ---------------------------------------------------------------------


def maskkern_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: MaskkernMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` entry: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) (fewer kv heads:
    grouped-query, read without repeat_kv); returns ((B, Lq, Hq, Dv) contiguous, None)."""
    _check_features(module, dropout, kwargs)
    B, Hq, Lq, _ = query.shape
    gqa = key.shape[1] != Hq
    common = dict(scale=scaling, enable_gqa=gqa, backend=BACKEND)
    if isinstance(attention_mask, MaskkernMask):
        # DataCollatorWithFlattening's cu_seq_lens_q say the row is packed even where transformers
        # did not detect it: with a cache (e.g. use_cache=True while training) and in bidirectional
        # models, whose masks transformers never builds per sequence (flash-attention's rule).
        flattened = (
            kwargs.get("cu_seq_lens_q") is not None
            and attention_mask.keys is None
            and attention_mask.causal in (True, False)
            and B == 1
            and Lq == key.shape[2]
        )
        if attention_mask.packed or flattened:
            return _packed_attention(query, key, value, attention_mask, kwargs, common), None
        out = attention(
            query,
            key,
            value,
            attention_mask.keys,
            causal=attention_mask.causal,
            window=attention_mask.window,
            **common,
        )
    elif attention_mask is None:
        # No mask was built (transformers skipped it): sdpa's rule for is_causal.
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        out = attention(query, key, value, causal=bool(causal) and Lq > 1, **common)
    elif isinstance(attention_mask, Tensor):
        out = attention(query, key, value, attention_mask, **common)  # a full mask: exact as it is
    else:
        raise TypeError(
            f"maskkern attention: attention_mask of type {type(attention_mask).__name__} is not "
            "supported (a tensor, a MaskkernMask or None)"
        )
    return out.transpose(1, 2).contiguous(), None


def _check_features(module: nn.Module, dropout: float, kwargs: dict) -> None:
    config = getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if name is not None and name not in _transformers().masking_utils.ALL_MASK_ATTENTION_FUNCTIONS:
        raise RuntimeError(
            f"maskkern attention runs as attn_implementation={name!r}, which has no "
            "AttentionMaskInterface entry: transformers would pass attention_mask=None and the "
            "padding would be attended to. Register it with maskkern.integrations.transformers."
            f"register({name!r}), which adds both entries."
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "maskkern attention does not support logit softcapping (softcap); use attn_implementation='eager'"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("maskkern attention does not support attention sinks (s_aux)")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("maskkern attention does not support an additive position bias")
    if dropout:
        raise NotImplementedError(
            f"maskkern attention does not support attention dropout > 0 while training (dropout={dropout}): "
            "set the config's attention dropout to 0, or call model.eval()"
        )


def _packed_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: MaskkernMask, kwargs: dict, common: dict
) -> Tensor:
    """Packed rows through varlen_attention, causal or not as ``mask`` says: (B, Lq, Hq, Dv)."""
    B, Hq, L, _ = query.shape
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None and B == 1:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = (_as_int(kwargs.get(n), L) for n in ("max_length_q", "max_length_k"))
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise NotImplementedError(
                "maskkern attention: a packed batch (position_ids restarting, no attention_mask) needs "
                "position_ids (or cu_seq_lens_q/k) in the attention's kwargs, and this model passes neither"
            )
        cu_q = cu_k = cu_seqlens_from_position_ids(position_ids.expand(B, -1))
        max_q = max_k = L  # a bound: no host sync (and traceable)

    def rows(x: Tensor) -> Tensor:  # (B, H, L, D) -> (B * L, H, D); a view when B == 1
        return x.transpose(1, 2).reshape(B * x.shape[2], x.shape[1], x.shape[3])

    out = varlen_attention(
        rows(query),
        rows(key),
        rows(value),
        cu_q,
        cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        causal=mask.causal,
        window=mask.window,
        **common,
    )
    return out.view(B, L, Hq, out.shape[-1])


def _as_int(x: Any, default: int) -> int:
    return default if x is None else int(x)


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """(B * L + 1,) int64 cu_seqlens of (B, L) position_ids flattened: a sequence starts at each
    row and wherever the position does not step by 1 (transformers' rule for packed rows). Of fixed
    size (sequences past the last are empty), so it needs no host sync."""
    B, L = position_ids.shape
    starts = torch.cat(
        [position_ids.new_ones((B, 1), dtype=torch.bool), position_ids.diff(dim=1) != 1], dim=1
    )
    sequence = starts.reshape(-1).cumsum(0) - 1
    return torch.searchsorted(sequence, torch.arange(B * L + 1, device=position_ids.device))


# --- register -----------------------------------------------------------------------------------


def register(name: str = NAME) -> str:
    """Registers maskkern under ``name`` in transformers' ``AttentionMaskInterface`` and
    ``AttentionInterface`` (both, always: see the module doc) and returns ``name``, to pass as
    ``attn_implementation``. Idempotent."""
    tf = _transformers()
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in _BUILTIN_NAMES:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations")
    tf.masking_utils.AttentionMaskInterface.register(name, maskkern_mask)  # the mask first
    tf.transformers.AttentionInterface.register(name, maskkern_attention)
    return name


# --- the losses ---------------------------------------------------------------------------------


def _loss_dtype(loss: Tensor) -> Tensor:
    """transformers' losses come back in fp32: maskkern's, fp32 for half inputs, fp64 kept."""
    return loss if loss.dtype == torch.float64 else loss.float()


def _cross_entropy(
    logits: Tensor, target: Tensor, num_items_in_batch: Any = None, ignore_index: int = -100
) -> Tensor:
    """transformers' ``fixed_cross_entropy``: mean, or sum / num_items_in_batch."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = masked_cross_entropy(
        logits, target, ignore_index=ignore_index, reduction=reduction, backend=BACKEND
    )
    return _per_item(loss, num_items_in_batch)


def _per_item(loss: Tensor, num_items_in_batch: Any) -> Tensor:
    """A "mean" loss as it is, a "sum" one / num_items_in_batch (when given)."""
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on ``mk.masked_cross_entropy``."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    loss = _cross_entropy(logits.reshape(-1, vocab_size), target, num_items_in_batch, ignore_index)
    return _loss_dtype(loss)


def masked_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    **kwargs: Any,
) -> Tensor:
    """transformers' ``ForMaskedLMLoss`` on ``mk.masked_cross_entropy``."""
    target = labels.reshape(-1).to(logits.device)
    loss = _cross_entropy(logits.reshape(-1, vocab_size), target, num_items_in_batch, ignore_index)
    return _loss_dtype(loss)


def sequence_classification_loss(labels: Tensor, pooled_logits: Tensor, config, **kwargs: Any) -> Tensor:
    """transformers' ``ForSequenceClassificationLoss``: single-label classification on
    ``mk.masked_cross_entropy``; regression (MSE) and multi-label (BCE) are transformers' own."""
    lu = _transformers().loss_utils
    num_labels = config.num_labels
    if config.problem_type is None:  # as transformers infers (and records) it
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type != "single_label_classification":
        return lu.ForSequenceClassificationLoss(labels, pooled_logits, config, **kwargs)
    target = labels.reshape(-1).to(pooled_logits.device)
    return _cross_entropy(
        pooled_logits.reshape(-1, num_labels),
        target,
        kwargs.get("num_items_in_batch"),
        kwargs.get("ignore_index", -100),
    )


def _maskkern_loss_for(current):
    """maskkern's version of transformers' loss function ``current``, None if it has none."""
    lu = _transformers().loss_utils
    return {
        lu.ForCausalLMLoss: causal_lm_loss,
        lu.ForMaskedLMLoss: masked_lm_loss,
        lu.ForSequenceClassificationLoss: sequence_classification_loss,
    }.get(current)


# --- the fused head -----------------------------------------------------------------------------


def supports_linear_cross_entropy(model: nn.Module) -> bool:
    """Whether ``apply(model, linear_cross_entropy=True)`` installs the fused head on ``model``."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cls = type(model).__name__
    return (
        getattr(config, "model_type", None) in LINEAR_CROSS_ENTROPY_MODELS
        and (cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"))
        and type(head) is nn.Linear
    )


def _head_loss(hidden: Tensor, head: nn.Linear, target: Tensor, num_items_in_batch: Any, ignore_index: int):
    """``causal_lm_loss(head(hidden), ...)`` without the logits: mk.linear_cross_entropy, which
    computes only the counted rows (it compacts them itself; ignored rows get zero gradient)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        h,
        head.weight,
        target.reshape(-1).to(h.device),
        head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=BACKEND,
    )
    return _loss_dtype(_per_item(loss, num_items_in_batch))


class _Installed(NamedTuple):
    """An attribute ``apply`` set in a model instance's ``__dict__``."""

    previous: Any  # the instance's own value before, or _ABSENT (the class's then shows through)
    original: Any  # what the attribute gave before: what the installed one falls back on


def _positional_names(function: Callable) -> tuple[str, ...]:
    """The names ``function`` binds positional arguments to, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds)


def _linear_cross_entropy_forward(self, names: tuple[str, ...], args: tuple, kwargs: dict):
    """The instance's forward with the fused head: training with ``labels``, the base model then
    ``mk.linear_cross_entropy`` (logits None); everything else, the original forward. Positional
    arguments are bound to ``names``, the original forward's parameters, as it would bind them."""
    original = getattr(self, _STATE)["forward"].original
    bound = dict(zip(names, args, strict=False))  # the names past args: not given
    if len(args) > len(names) or any(name in kwargs for name in bound):
        return original(*args, **kwargs)  # not bindable: the original's own TypeError
    bound.update(kwargs)
    if not (self.training and bound.get("labels") is not None):
        return original(*args, **kwargs)
    tf = _transformers()
    labels = bound.pop("labels")
    num_items_in_batch = bound.pop("num_items_in_batch", None)
    shift_labels = bound.pop("shift_labels", None)
    ignore_index = bound.pop("ignore_index", -100)
    logits_to_keep = bound.pop("logits_to_keep", 0)
    return_dict = bound.pop("return_dict", None)
    if return_dict is None:  # transformers' can_return_tuple: the config decides
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.base_model(**bound, return_dict=True)
    hidden = outputs[0]
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        hidden = tf.modeling_utils.slice_logits_to_keep(hidden, logits_to_keep)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = _head_loss(hidden, self.get_output_embeddings(), shift_labels, num_items_in_batch, ignore_index)
    out = tf.outputs.CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        cache=getattr(outputs, "cache", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    if return_dict:
        return out
    # to_tuple() leaves the None logits out; transformers' tuple has them second (Liger keeps a None).
    return (loss, None, *out.to_tuple()[1:])


def _forward_like(function: Callable, names: tuple[str, ...]):
    """_linear_cross_entropy_forward with ``function``'s name, doc and signature: generate() and
    Trainer read the forward's signature (e.g. to decide whether to pass position_ids)."""

    def forward(self, *args: Any, **kwargs: Any):
        return _linear_cross_entropy_forward(self, names, args, kwargs)

    return functools.update_wrapper(forward, function)


def _create_masks_for_generate(self, *args: Any, **kwargs: Any):
    """The model's ``create_masks_for_generate`` (generate() looks it up on the instance) with the
    mask entry building full tensors: generate() builds the masks of compileable caches before the
    forward, which passes them back through ``create_*_mask``, and that keeps only tensors."""
    global _FULL_MASKS
    previous, _FULL_MASKS = _FULL_MASKS, True
    original = getattr(self, _STATE)["masks_for_generate"].original
    if original is None:  # generate()'s own fallback
        original = _transformers().masking_utils.create_masks_for_generate
    try:
        return original(*args, **kwargs)
    finally:
        _FULL_MASKS = previous


# --- apply --------------------------------------------------------------------------------------


def apply(
    model: nn.Module,
    *,
    attention: bool = True,
    loss: bool = True,
    linear_cross_entropy: bool = True,
    pad_embedding: bool = True,
    name: str = NAME,
) -> nn.Module:
    """maskkern in one transformers model instance (see the module doc), in place; returns it.

    Each option True installs its part (once: calling again changes nothing), False removes what an
    earlier call installed (``unapply`` = all False). ``linear_cross_entropy`` applies to the models
    of ``LINEAR_CROSS_ENTROPY_MODELS`` (elsewhere it is left out; ``applied(model)`` says what is
    in); ``loss`` to the cross-entropy losses transformers maps by loss_type; ``pad_embedding`` to a
    plain nn.Embedding input embedding when the config has a pad token. Atomic: when a part fails,
    the parts changed before it are put back and the model is as it was.
    """
    _transformers()
    state = dict(model.__dict__.get(_STATE, {}))  # committed only once every part succeeded
    undo: list[Callable[[], None]] = []
    try:
        _apply_attention(model, attention, name, state, undo)
        if loss and "loss" not in state:
            ours = _maskkern_loss_for(model.loss_function)
            if ours is not None:
                _install(model, "_loss_function", ours, "loss", state, undo)
        elif not loss and "loss" in state:
            _uninstall(model, "_loss_function", "loss", state, undo)
        if linear_cross_entropy and "forward" not in state and supports_linear_cross_entropy(model):
            names = _positional_names(model.forward)
            forward = types.MethodType(_forward_like(type(model).forward, names), model)
            _install(model, "forward", forward, "forward", state, undo)
        elif not linear_cross_entropy and "forward" in state:
            _uninstall(model, "forward", "forward", state, undo)
        _apply_pad_embedding(model, pad_embedding, state, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    if state:
        model.__dict__[_STATE] = state
    else:
        model.__dict__.pop(_STATE, None)
    return model


def _apply_attention(model: nn.Module, on: bool, name: str, state: dict, undo: list) -> None:
    if on and "attention" not in state:
        register(name)
        previous = model.config._attn_implementation
        undo.append(lambda: model.set_attn_implementation(previous))  # first: set may fail midway
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise NotImplementedError(
                f"{type(model).__name__} does not take its attention from transformers' AttentionInterface"
            )
        state["attention"] = previous
        masks = types.MethodType(_create_masks_for_generate, model)
        _install(model, "create_masks_for_generate", masks, "masks_for_generate", state, undo)
    elif not on and "attention" in state:
        current = model.config._attn_implementation
        undo.append(lambda: model.set_attn_implementation(current))
        model.set_attn_implementation(state.pop("attention"))
        _uninstall(model, "create_masks_for_generate", "masks_for_generate", state, undo)


def _apply_pad_embedding(model: nn.Module, on: bool, state: dict, undo: list) -> None:
    if on and "embedding" not in state:
        embedding = model.get_input_embeddings()
        if (
            getattr(model.config, "pad_token_id", None) is not None
            and type(embedding) is nn.Embedding
            and not embedding.sparse
        ):
            model.set_input_embeddings(_pad_embedding_like(embedding))
            undo.append(lambda: model.set_input_embeddings(embedding))
            state["embedding"] = embedding
    elif not on and "embedding" in state:
        current = model.get_input_embeddings()
        model.set_input_embeddings(state.pop("embedding"))
        undo.append(lambda: model.set_input_embeddings(current))


def _install(model: nn.Module, attr: str, value: Any, key: str, state: dict, undo: list) -> None:
    """Sets ``attr`` in the instance's ``__dict__``, remembering in ``state[key]`` what was there."""
    state[key] = _Installed(model.__dict__.get(attr, _ABSENT), getattr(model, attr, None))
    undo.append(functools.partial(_put, model, attr, state[key].previous))
    _put(model, attr, value)


def _uninstall(model: nn.Module, attr: str, key: str, state: dict, undo: list) -> None:
    """Puts back what ``_install`` found in the instance's ``__dict__``."""
    undo.append(functools.partial(_put, model, attr, model.__dict__.get(attr, _ABSENT)))
    _put(model, attr, state.pop(key).previous)


def _put(model: nn.Module, attr: str, value: Any) -> None:
    if value is _ABSENT:
        model.__dict__.pop(attr, None)
    else:
        model.__dict__[attr] = value


def unapply(model: nn.Module) -> nn.Module:
    """Removes everything ``apply`` installed in ``model``; returns it."""
    return apply(model, attention=False, loss=False, linear_cross_entropy=False, pad_embedding=False)


def applied(model: nn.Module) -> frozenset[str]:
    """The parts of ``apply`` installed in ``model``: a subset of {"attention", "loss",
    "linear_cross_entropy", "pad_embedding"}."""
    state = model.__dict__.get(_STATE, {})
    names = {"attention": "attention", "loss": "loss", "forward": "linear_cross_entropy"}
    names["embedding"] = "pad_embedding"
    return frozenset(names[k] for k in state if k in names)


def _pad_embedding_like(embedding: nn.Embedding) -> PadEmbedding:
    """A PadEmbedding holding ``embedding``'s own Parameter (ties and state_dict unchanged)."""
    new = PadEmbedding(
        embedding.num_embeddings,
        embedding.embedding_dim,
        embedding.padding_idx,
        embedding.max_norm,
        embedding.norm_type,
        embedding.scale_grad_by_freq,
        _weight=embedding.weight.detach(),
        backend=BACKEND,
    )
    new.weight = embedding.weight
    return new
