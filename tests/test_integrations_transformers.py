"""maskkern.integrations.transformers against transformers' own sdpa attention and HF loss, on tiny
random-init models built from configs (no downloads): Llama (GQA), Qwen2 (full and sliding layers),
Mistral (sliding window), GPT-2 (tied head) and Bert (bidirectional); right, left and no padding;
packed batches (position_ids and DataCollatorWithFlattening's cu_seq_lens, causal and Bert's
bidirectional); greedy generate with dynamic and static KV caches; torch.compile(fullgraph=True);
the missing-mask trap; the fused forward's calling conventions (positional arguments,
return_dict=False, logits_to_keep); apply's atomicity, save/from_pretrained, and the import without
transformers.

Equal means: float64 tight; float32 within a few times eager's own error (sdpa in fp32 against the
fp64 reference). In fp64 the reference loss is the HF loss formula in fp64 (HF's ForCausalLMLoss
casts the logits to fp32 first), in fp32 it is HF's loss itself.
"""

import copy
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)"
)

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    DataCollatorWithFlattening,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import maskkern as mk  # noqa: E402
import maskkern.integrations.transformers as mkt  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, pad_token_id=0)


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2))


def qwen2():
    cfg = Qwen2Config(
        **(SMALL | dict(num_hidden_layers=3)),
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    return Qwen2ForCausalLM(cfg)


def mistral():
    return MistralForCausalLM(
        MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    )


def gpt2():
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


def bert():
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return BertForMaskedLM(cfg)


MODELS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2, "bert": bert}
CAUSAL = ("llama", "qwen2", "mistral", "gpt2")


# Every family and padding on the default backend (cpu here); one of each family on "torch", the
# materialised reference.
CASES = [
    (f, p, None) for f in ("llama", "qwen2", "mistral", "gpt2", "bert") for p in ("right", "left", "none")
]
CASES += [("llama", "right", "torch"), ("qwen2", "none", "torch"), ("mistral", "left", "torch")]
CASES += [("gpt2", "left", "torch"), ("bert", "right", "torch")]


def build(family: str, dtype: torch.dtype, seed: int = 0):
    """(sdpa reference, maskkern twin): the same weights, the twin through mkt.apply."""
    torch.manual_seed(seed)
    ref = MODELS[family]().to(dtype)
    ref.set_attn_implementation("sdpa")
    ours = mkt.apply(copy.deepcopy(ref))
    return ref, ours


def batch(padding: str, B: int = 3, L: int = 10, seed: int = 1):
    """input_ids (B, L), attention_mask, lengths; every row has >= 3 real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    lengths = torch.tensor([L, L - 4, 3][:B]) if padding != "none" else torch.full((B,), L)
    real = torch.arange(L) < lengths[:, None]
    if padding == "left":
        real = real.flip(1)
    ids = ids.masked_fill(~real, 0)
    return ids, real.long(), lengths


def mlm_labels(ids, mask, seed=2):
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=g) < 0.5) & mask.bool()
    chosen[:, 0] |= mask[:, 0].bool()
    return ids.masked_fill(~chosen, -100)


def reference_loss(family, logits, labels):
    """HF's loss formula in the logits' dtype (HF itself computes it in fp32)."""
    if family == "bert":
        return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1))


def assert_close(actual, expected, dtype, eager=None, what=""):
    """fp64: tight. fp32: |actual - fp64 reference| within 4x eager's own error + a few ulps."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=what)
        return
    own = (eager.double() - expected.double()).abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= 4 * own + 1e-6 * scale + 1e-7, f"{what}: error {err:.3g}, eager's own {own:.3g}"


def step(model, ids, mask, labels, **kwargs):
    """Train-mode forward + backward: (loss, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def labels_of(family, ids, mask):
    return mlm_labels(ids, mask) if family == "bert" else ids.masked_fill(mask == 0, -100)


# --- logits, loss and gradients equal sdpa + HF loss ----------------------------------------------


@pytest.mark.parametrize(
    "family, padding, backend", CASES, ids=[f"{f}-{p}-{b or 'default'}" for f, p, b in CASES]
)
def test_logits_loss_grads_match_sdpa(family, padding, backend, monkeypatch):
    monkeypatch.setattr(mkt, "BACKEND", backend)
    ids, mask, _ = batch(padding)
    labels = labels_of(family, ids, mask)
    real = mask.bool()[..., None]
    ref64, ours64 = build(family, torch.float64)
    ref32, ours32 = build(family, torch.float32)
    with torch.no_grad():
        for m in (ref64, ours64, ref32, ours32):
            m.eval()
        logits = {k: m(input_ids=ids, attention_mask=mask).logits for k, m in
                  dict(r64=ref64, o64=ours64, r32=ref32, o32=ours32).items()}  # fmt: skip
    for k in logits:
        logits[k] = logits[k].masked_fill(~real, 0)
    assert_close(logits["o64"], logits["r64"], torch.float64, what="fp64 logits")
    assert_close(logits["o32"], logits["r64"], torch.float32, eager=logits["r32"], what="fp32 logits")

    out_r64 = ref64.train()(input_ids=ids, attention_mask=mask)
    loss_r64 = reference_loss(family, out_r64.logits, labels)
    ref64.zero_grad(set_to_none=True)
    loss_r64.backward()
    g_r64 = {n: p.grad for n, p in ref64.named_parameters() if p.grad is not None}
    out_o64, g_o64 = step(ours64, ids, mask, labels)
    out_r32, g_r32 = step(ref32, ids, mask, labels)
    out_o32, g_o32 = step(ours32, ids, mask, labels)
    if family in CAUSAL:
        assert out_o64.logits is None and out_o32.logits is None  # the fused head: no logits built
    assert out_o64.loss.dtype == torch.float64 and out_o32.loss.dtype == torch.float32
    assert_close(out_o64.loss, loss_r64.detach(), torch.float64, what="fp64 loss")
    assert_close(
        out_o32.loss, loss_r64.detach(), torch.float32, eager=out_r32.loss.detach(), what="fp32 loss"
    )
    assert g_o64.keys() == g_r64.keys() == g_o32.keys() == g_r32.keys()
    for n in g_r64:
        assert_close(g_o64[n], g_r64[n], torch.float64, what=f"fp64 grad {n}")
        assert_close(g_o32[n], g_r64[n], torch.float32, eager=g_r32[n], what=f"fp32 grad {n}")


def test_hf_loss_features_num_items_and_shift_labels():
    """The loss_function path (no fused head) and the fused head both keep num_items_in_batch and
    shift_labels as transformers has them."""
    ids, mask, _ = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ref, ours = build("llama", torch.float64)
    plain = mkt.apply(copy.deepcopy(ref), linear_cross_entropy=False)
    logits = ref(input_ids=ids, attention_mask=mask).logits
    n = torch.tensor(7)
    expected = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), reduction="sum") / 7
    for model in (ours, plain):
        for kwargs in (dict(labels=labels), dict(labels=labels, shift_labels=shift)):
            out = model.train()(input_ids=ids, attention_mask=mask, num_items_in_batch=n, **kwargs)
            torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-9, atol=1e-11)
    direct = mkt.causal_lm_loss(logits, labels, V, num_items_in_batch=n)
    torch.testing.assert_close(direct, expected, rtol=1e-9, atol=1e-11)
    assert ForCausalLMLoss(logits, labels, V, num_items_in_batch=n).dtype == torch.float32  # HF's downcast


def test_sequence_classification_loss():
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, num_labels=3)
    ref = LlamaForSequenceClassification(cfg).double()
    ref.set_attn_implementation("sdpa")
    ours = mkt.apply(copy.deepcopy(ref))
    assert mkt.applied(ours) == {"attention", "loss", "pad_embedding"}
    ids, mask, _ = batch("right")
    labels = torch.tensor([0, 2, 1])
    r, o = (m(input_ids=ids, attention_mask=mask, labels=labels) for m in (ref, ours))
    torch.testing.assert_close(o.logits, r.logits, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(o.loss, r.loss, rtol=1e-9, atol=1e-11)


def test_masked_lm_loss_num_items_in_batch():
    """ModernBert's masked-LM loss goes through model.loss_function (Bert's calls CrossEntropyLoss
    itself, so its loss stays transformers' whatever apply does)."""
    cfg = ModernBertConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        local_attention=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        cls_token_id=1,
        sep_token_id=2,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    ref = ModernBertForMaskedLM(cfg).double()
    ref.set_attn_implementation("sdpa")
    ours = mkt.apply(copy.deepcopy(ref))
    assert "loss" in mkt.applied(ours)
    ids, mask, _ = batch("right")
    labels = mlm_labels(ids, mask)
    n = torch.tensor(5)
    hf = ref.train()(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    expected = F.cross_entropy(hf.logits.reshape(-1, V), labels.reshape(-1), reduction="sum") / 5
    out = ours.train()(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.loss, hf.loss.double(), rtol=1e-6, atol=1e-7)  # HF's fp32 loss
    direct = mkt.masked_lm_loss(hf.logits, labels, V, num_items_in_batch=n)
    torch.testing.assert_close(direct, expected, rtol=1e-9, atol=1e-11)


# --- the fused forward's calling conventions ------------------------------------------------------


def test_fused_forward_binds_positional_arguments():
    """Positional arguments are bound as the original forward binds them (GPT-2 has cache second),
    so the fused head runs whenever labels are given."""
    ids, mask, _ = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    for family, args, kwargs in (
        ("llama", (ids, mask), dict(labels=labels)),
        ("llama", (ids, mask, None, None, None, labels), {}),
        ("gpt2", (ids, None, mask), dict(labels=labels)),
    ):
        _, ours = build(family, torch.float64)
        expected = ours.train()(input_ids=ids, attention_mask=mask, labels=labels).loss
        out = ours(*args, **kwargs)
        assert out.logits is None, family  # the fused head, not the logits fallback
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    with pytest.raises(TypeError):
        ours(ids, attention_mask=mask, input_ids=ids, labels=labels)  # the original's own error


def test_fused_forward_return_dict_false_keeps_the_logits_slot():
    """transformers' tuple is (loss, logits, cache, ...): the fused head keeps None second."""
    ids, mask, _ = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    ref, ours = build("llama", torch.float64)
    for kwargs in (dict(return_dict=False), dict(return_dict=False, use_cache=False)):
        expected = ref.train()(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        got = ours.train()(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        assert isinstance(got, tuple) and len(got) == len(expected) and got[1] is None
        assert [type(x) for x in got[2:]] == [type(x) for x in expected[2:]]
        torch.testing.assert_close(got[0], expected[0].double(), rtol=1e-6, atol=1e-7)  # HF's fp32 loss
    # the config's return_dict decides when the call does not (transformers' can_return_tuple)
    ours.config.return_dict = False
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(got, tuple) and got[1] is None


def test_fused_forward_logits_to_keep():
    """logits_to_keep=k with labels for the last k positions, as transformers computes it."""
    ids, mask, _ = batch("none")
    labels = ids[:, -3:]
    ref, ours = build("llama", torch.float64)
    logits = ref.train()(input_ids=ids, attention_mask=mask).logits[:, -3:]
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1))
    out = ours.train()(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=3)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-9, atol=1e-11)


def test_fused_head_leaves_the_ignored_rows_to_the_op(monkeypatch):
    """mk.linear_cross_entropy compacts the counted rows itself: the forward hands it every row."""
    seen = []
    real = mkt.linear_cross_entropy

    def spy(hidden, weight, target, *args, **kwargs):
        seen.append((hidden.shape[0], int((target == kwargs["ignore_index"]).sum())))
        return real(hidden, weight, target, *args, **kwargs)

    monkeypatch.setattr(mkt, "linear_cross_entropy", spy)
    ids, mask, _ = batch("right")
    _, ours = build("llama", torch.float64)
    ours.train()(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    B, L = ids.shape
    assert seen == [(B * L, B * L - int(mask.sum()) + B)]  # padding and each row's last position


# --- packed batches -------------------------------------------------------------------------------


def packed_from(ids, lengths, flash_kwargs):
    features = [{"input_ids": row[:n].tolist()} for row, n in zip(ids, lengths.tolist(), strict=True)]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_packed_batch_matches_padded_sdpa(family, flash_kwargs):
    """The same sequences packed in one row (DataCollatorWithFlattening) give the padded batch's
    logits at every real token, its loss and its gradients."""
    ids, mask, lengths = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # the collator's separator: the first token of each sequence is not a target
    ref, ours = build(family, torch.float64)
    packed = packed_from(ids, lengths, flash_kwargs)
    if not flash_kwargs:
        # transformers detects packing from position_ids only without a cache (sdpa's mask too);
        # cu_seq_lens_q are honoured either way.
        packed["use_cache"] = False
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = ours.eval()(**inputs).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    _, g_ref = step(ref, ids, mask, labels)
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    ours.train().zero_grad(set_to_none=True)
    out = ours(**packed)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss_ref.double(), rtol=1e-6, atol=1e-7)  # HF's fp32 loss
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_packed_bidirectional_matches_each_sequence_alone():
    """Bert on DataCollatorWithFlattening(return_flash_attn_kwargs=True): each sequence attends to
    itself only. sdpa is no oracle here (it attends across the row): each sequence run alone is."""
    ids, _, lengths = batch("right")
    ref, ours = build("bert", torch.float64)
    packed = packed_from(ids, lengths, flash_kwargs=True)
    labels = mlm_labels(packed["input_ids"], torch.ones_like(packed["input_ids"]))
    packed["labels"] = labels
    ref.train().zero_grad(set_to_none=True)
    alone = [ref(input_ids=row[None, :n]).logits[0] for row, n in zip(ids, lengths.tolist(), strict=True)]
    logits = torch.cat(alone)
    loss = F.cross_entropy(logits, labels[0])
    loss.backward()
    ours.train().zero_grad(set_to_none=True)
    out = ours(**packed)
    out.loss.backward()
    assert_close(out.logits[0], logits.detach(), torch.float64, what="logits")
    assert_close(out.loss, loss.detach(), torch.float64, what="loss")
    for (n, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert_close(q.grad, p.grad, torch.float64, what=f"grad {n}")


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    cu = mkt.cu_seqlens_from_position_ids(pos)
    assert cu.shape == (13,)
    assert cu[:5].tolist() == [0, 3, 5, 6, 12] and (cu[5:] == 12).all()


# --- what the mask function hands the attention -------------------------------------------------


def captured_masks(model, **inputs):
    seen = []
    original = mkt.maskkern_attention

    def spy(module, q, k, v, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, q, k, v, attention_mask, **kwargs)

    name = "maskkern_spy"
    AttentionMaskInterface.register(name, mkt.maskkern_mask)
    AttentionInterface.register(name, spy)
    try:
        model.set_attn_implementation(name)
        with torch.no_grad():
            model.eval()(**inputs)
    finally:
        AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)
    return seen


def test_mask_descriptions_are_the_cheapest_exact_ones():
    ids, mask, lengths = batch("right")
    B, L = ids.shape
    m = llama()
    # key padding: a (B, 1, 1, L) view, causal a flag
    (d, *_) = captured_masks(m, input_ids=ids, attention_mask=mask)
    assert isinstance(d, mkt.MaskkernMask) and d.causal is True and not d.packed and d.window is None
    assert d.keys.shape == (B, 1, 1, L) and torch.equal(d.keys[:, 0, 0], mask.bool())
    # no padding mask: nothing at all
    (d, *_) = captured_masks(m, input_ids=ids)
    assert d.keys is None and d.causal is True
    # sliding window: a window, not a mask
    (d, *_) = captured_masks(mistral(), input_ids=ids, attention_mask=mask)
    assert d.window == (3, 0) and d.causal is True and d.keys.shape == (B, 1, 1, L)
    # packed sequences: a flag, the attention reads cu_seqlens from the kwargs
    packed = packed_from(ids, lengths, flash_kwargs=False)
    packed.pop("labels")
    packed["use_cache"] = False
    (d, *_) = captured_masks(m, **packed)
    assert d.packed and d.keys is None
    # bidirectional (Bert): a key view, not causal
    (d, *_) = captured_masks(bert(), input_ids=ids, attention_mask=mask)
    assert d.causal is False and d.keys.shape == (B, 1, 1, L)
    # a 4-D mask of the user's own is passed through as it is
    custom = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    (d, *_) = captured_masks(m, input_ids=ids, attention_mask=custom)
    assert d is custom


def test_prefix_lm_overlay_gets_the_full_mask():
    """An or_mask_function overlay (prefix-LM) is not a flag: the full sdpa mask, exact."""
    from transformers.masking_utils import create_causal_mask

    m = mkt.apply(llama())
    ids, mask, _ = batch("right")
    embeds = torch.zeros(*ids.shape, 32)

    def prefix(b, h, q, kv):
        return kv < 4

    got = create_causal_mask(m.config, embeds, mask, None, or_mask_function=prefix)
    assert isinstance(got, torch.Tensor) and got.shape == (3, 1, 10, 10)
    m.set_attn_implementation("sdpa")
    want = create_causal_mask(m.config, embeds, mask, None, or_mask_function=prefix)
    assert torch.equal(got, want)


# --- generate, compile --------------------------------------------------------------------------


GENERATE = [(f, "dynamic") for f in CAUSAL] + [(f, "static") for f in ("llama", "mistral", "qwen2")]


@pytest.mark.parametrize("family, cache", GENERATE, ids=[f"{f}-{c}" for f, c in GENERATE])
def test_greedy_generate_with_kv_cache_same_tokens(family, cache):
    """Left-padded prompts, a KV cache (Mistral's sliding cache outgrows its window of 4). A static
    cache makes generate() build the masks ahead of the forward, which passes them back through
    create_*_mask: apply's create_masks_for_generate makes them tensors."""
    ids, mask, _ = batch("left", L=8)
    ref, ours = build(family, torch.float64)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    kwargs["cache_implementation"] = cache
    expected = ref.eval().generate(ids, **kwargs)
    got = ours.eval().generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_static_cache_generate_with_register_alone_says_what_to_do():
    ids, mask, _ = batch("left", L=8)
    model = llama().eval()
    model.set_attn_implementation(mkt.register())
    with pytest.raises(AttributeError, match=r"apply\(model\)"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="static"
        )


@pytest.mark.parametrize("case", ["padded", "packed"])
def test_torch_compile_fullgraph(case):
    """A training forward + backward under torch.compile(fullgraph=True): no graph break."""
    torch._dynamo.reset()
    ids, mask, lengths = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    _, ours = build("llama", torch.float32)
    if case == "padded":
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    else:
        inputs = dict(packed_from(ids, lengths, flash_kwargs=False), use_cache=False)
    eager_out = ours.train()(**inputs)
    eager_grads = torch.autograd.grad(eager_out.loss, list(ours.parameters()))
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    out = compiled(**inputs)
    grads = torch.autograd.grad(out.loss, list(ours.parameters()))
    torch.testing.assert_close(out.loss, eager_out.loss)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


# --- the missing-mask trap ----------------------------------------------------------------------


def test_register_adds_both_entries():
    name = mkt.register("maskkern_both")
    try:
        assert AttentionInterface._global_mapping[name] is mkt.maskkern_attention
        assert AttentionMaskInterface._global_mapping[name] is mkt.maskkern_mask
    finally:
        AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)
    with pytest.raises(ValueError, match="transformers' own"):
        mkt.register("sdpa")


def test_missing_mask_trap():
    """What register() prevents: an attention registered without a mask function of its name gets
    attention_mask=None and attends to the padding. maskkern's attention refuses to run that way."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ids, mask, _ = batch("left")  # causal: only left padding sits where real queries look
    ref, _ = build("llama", torch.float64)
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
    trap = copy.deepcopy(ref)
    AttentionInterface.register("sdpa_without_mask", sdpa_attention_forward)
    AttentionInterface.register("maskkern_without_mask", mkt.maskkern_attention)
    try:
        trap.set_attn_implementation("sdpa_without_mask")
        with torch.no_grad():
            leaked = trap.eval()(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert (leaked[real] - expected[real]).abs().max() > 1e-3  # the padding leaked in, silently
        trap.set_attn_implementation("maskkern_without_mask")
        with pytest.raises(RuntimeError, match="no AttentionMaskInterface entry"):
            trap(input_ids=ids, attention_mask=mask)
    finally:
        AttentionInterface._global_mapping.pop("sdpa_without_mask")
        AttentionInterface._global_mapping.pop("maskkern_without_mask")


# --- apply: per instance, idempotent, reversible --------------------------------------------------


def test_apply_is_per_instance_idempotent_and_reversible():
    torch.manual_seed(0)
    model = gpt2()
    model.set_attn_implementation("sdpa")
    other = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = model.loss_function
    mkt.apply(model)
    mkt.apply(model)
    assert mkt.applied(model) == {"attention", "loss", "linear_cross_entropy", "pad_embedding"}
    assert model.config._attn_implementation == "maskkern"
    assert isinstance(model.get_input_embeddings(), mk.nn.PadEmbedding)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert model.state_dict().keys() == before.keys()
    # the other instance, and the classes, are untouched
    assert other.config._attn_implementation == "sdpa" and "forward" not in other.__dict__
    assert other.loss_function is loss_before and type(other.get_input_embeddings()) is torch.nn.Embedding
    assert type(model).forward is GPT2LMHeadModel.forward
    # a deep copy is applied to itself, and unapplies cleanly
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone and clone.create_masks_for_generate.__self__ is clone
    mkt.unapply(clone)
    assert {"forward", "_loss_function", "create_masks_for_generate"}.isdisjoint(clone.__dict__)
    mkt.apply(model, attention=False)
    assert model.config._attn_implementation == "sdpa" and mkt.applied(model) == {
        "loss",
        "linear_cross_entropy",
        "pad_embedding",
    }
    mkt.unapply(model)
    assert mkt.applied(model) == frozenset()
    assert {"forward", "_loss_function", "create_masks_for_generate", "_maskkern_state"}.isdisjoint(
        model.__dict__
    )
    assert model.loss_function is loss_before
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert model.lm_head.weight is model.get_input_embeddings().weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_apply_is_atomic():
    """A part that fails puts back the parts changed before it: the model is as it was."""
    torch.manual_seed(0)
    model = llama()
    model.set_attn_implementation("sdpa")
    loss_before = model.loss_function

    def as_it_was():
        return (
            model.config._attn_implementation == "sdpa"
            and {"forward", "_loss_function", "create_masks_for_generate", "_maskkern_state"}.isdisjoint(
                model.__dict__
            )
            and model.loss_function is loss_before
            and type(model.get_input_embeddings()) is torch.nn.Embedding
        )

    def fail(*args):
        raise RuntimeError("set_input_embeddings failed")

    # the attention cannot be set (a model off AttentionInterface)
    model.__dict__["_can_set_attn_implementation"] = lambda: False
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        mkt.apply(model)
    del model.__dict__["_can_set_attn_implementation"]
    assert as_it_was()
    # the last part fails after the others were installed
    model.__dict__["set_input_embeddings"] = fail
    with pytest.raises(RuntimeError, match="set_input_embeddings failed"):
        mkt.apply(model)
    assert as_it_was()
    # what an earlier call installed stays
    del model.__dict__["set_input_embeddings"]
    mkt.apply(model, pad_embedding=False)
    model.__dict__["set_input_embeddings"] = fail
    with pytest.raises(RuntimeError):
        mkt.apply(model)
    assert mkt.applied(model) == {"attention", "loss", "linear_cross_entropy"}


def test_save_pretrained_then_from_pretrained_and_apply(tmp_path):
    """What an applied model saves loads anywhere (nothing of maskkern in its config), and a model
    from from_pretrained takes apply like one from from_config."""
    ids, mask, _ = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    _, ours = build("llama", torch.float32)
    ours.save_pretrained(tmp_path)
    assert "maskkern" not in (tmp_path / "config.json").read_text()
    loaded = mkt.apply(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert mkt.applied(loaded) == {"attention", "loss", "linear_cross_entropy", "pad_embedding"}
    out, grads = step(loaded, ids, mask, labels)
    expected, expected_grads = step(ours, ids, mask, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss)
    assert grads.keys() == expected_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], msg=n)


def test_imports_without_transformers():
    """The module imports without transformers; using it raises an ImportError naming it."""
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import torch\n"
        "import maskkern.integrations.transformers as mkt\n"
        "for use in (mkt.register, lambda: mkt.apply(torch.nn.Linear(1, 1))):\n"
        "    try:\n"
        "        use()\n"
        "    except ImportError as exc:\n"
        "        print('ImportError:', exc)\n"
    )
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(
        line.startswith("ImportError:") and "transformers" in line for line in lines
    )


def test_no_private_registry_reads():
    """transformers' registries are read through their public mapping API (``in``, ``[]``), never
    their private ``_global_mapping``."""
    assert "_global_mapping" not in inspect.getsource(mkt)


def test_inference_forward_is_untouched():
    ids, mask, _ = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    ref, ours = build("llama", torch.float64)
    with torch.no_grad():
        out = ours.eval()(input_ids=ids, attention_mask=mask, labels=labels)
        expected = ref.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and out.logits.shape == expected.logits.shape
    torch.testing.assert_close(out.loss, expected.loss.double(), rtol=1e-6, atol=1e-7)


# --- what raises --------------------------------------------------------------------------------


def test_unsupported_features_raise():
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)
    model = mkt.apply(LlamaForCausalLM(cfg))
    ids, mask, _ = batch("right")
    with pytest.raises(NotImplementedError, match="dropout"):
        model.train()(input_ids=ids, attention_mask=mask)
    model.eval()(input_ids=ids, attention_mask=mask)  # no dropout in eval
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 2, 5, 8)
    for kwargs, match in ((dict(softcap=30.0), "softcapping"), (dict(s_aux=torch.zeros(4)), "sinks")):
        with pytest.raises(NotImplementedError, match=match):
            mkt.maskkern_attention(module, q, k, v, None, **kwargs)
