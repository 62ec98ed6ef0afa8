"""Hugging Face transformers: the training step of a random-init Llama (from_config, no download)
with transformers' sdpa attention + HF loss ("eager") against the same model after one call,
``maskkern.integrations.transformers.apply(model)`` ("maskkern"), on a padded batch and on the same
sequences packed into one row (DataCollatorWithFlattening: position_ids restarting, cu_seq_lens).

One step = forward with labels, backward (the optimizer is not in the timed step; the loss curves
below run it). The table's tokens/s column counts the real (non-pad) tokens of the batch, the same
in both layouts, per provider; peak memory is one step's, above what is live before it
(bench/_harness.py).

Targets (this CPU, fp32, ratios measured in one run), set at the issue's model and batch (hidden
256, 4 layers, 8 heads / 4 kv heads, vocab 32000, B = 8, L = 512, lengths ~ U[L/4, L]): maskkern's
tokens/s >= 1.8x eager's on the padded batch, at <= 0.55x its peak memory; the two losses agree to
1e-5: max |loss_maskkern - loss_sdpa| over 20 AdamW steps run in lockstep from the same weights on
the same batches (a new padded batch each step); maskkern on the packed batch (the padded batch's
sequences, the same tokens, no padding) >= maskkern on the padded one. A --quick run uses a smaller
model and batch (QUICK) and 5 steps: its targets are indicative.

    python bench/bench_transformers.py [--quick] [--threads N] [--backend torch]
"""

from __future__ import annotations

import copy
import sys

import torch
import transformers  # bench/run.py leaves this script out when transformers is missing
from _harness import Case, CaseResult, Context, Target, main, ratio
from torch import Tensor
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

import maskkern.integrations.transformers as mkt

KERNEL = "transformers"
SEED = 0
LR = 1e-3
# (model sizes, batch, max length, lockstep steps). FULL is the model: hidden 256, 4 layers,
# 8 heads / 4 kv heads, vocab 32000 (intermediate 688: Llama's 2.6875 x hidden), B = 8, L = 512.
FULL = (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=32000), 8, 512, 20)
QUICK = (dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, vocab_size=4000), 4, 128, 5)
AGREE_TOL = 1e-5  # max |Δloss| over the lockstep steps (fp32)
PADDED, PACKED = "padded", "packed"
PADDED_BASELINE = "maskkern padded"  # maskkern on the padded batch, timed in the packed case's rounds


def _plan(ctx: Context):
    return QUICK if ctx.quick else FULL


def llama_config(sizes: dict, max_len: int) -> LlamaConfig:
    return LlamaConfig(
        **sizes,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max_len,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


def _generator(B: int, L: int, seed: int) -> tuple[torch.Generator, Tensor]:
    """The batch's seeded generator, after drawing the lengths ~ U[L/4, L] (B,), and the lengths."""
    g = torch.Generator().manual_seed(seed)
    return g, torch.randint(L // 4, L + 1, (B,), generator=g)


def padded_batch(vocab: int, B: int, L: int, seed: int, device: torch.device) -> dict[str, Tensor]:
    """input_ids (B, L) right-padded with lengths ~ U[L/4, L]; labels = the ids, -100 at pads and at
    each sequence's first token (as DataCollatorWithFlattening has them, so the two layouts count
    the same targets)."""
    g, lengths = _generator(B, L, seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    real = torch.arange(L) < lengths[:, None]
    ids = ids.masked_fill(~real, 0)
    labels = ids.masked_fill(~real, -100)
    labels[:, 0] = -100
    batch = dict(input_ids=ids, attention_mask=real.long(), labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def packed_batch(padded: dict[str, Tensor]) -> dict:
    """The padded batch's sequences in one row, as DataCollatorWithFlattening makes it (with the
    flash-attention kwargs); use_cache=False, without which transformers' sdpa mask does not see
    the packing."""
    ids, mask = padded["input_ids"].cpu(), padded["attention_mask"].cpu()
    features = [{"input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask, strict=True)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    device = padded["input_ids"].device
    out = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return out | {"use_cache": False}


def build(sizes: dict, max_len: int, device: torch.device, backend: str | None) -> dict[str, torch.nn.Module]:
    """The eager model (sdpa + HF loss) and its maskkern twin: the same weights."""
    torch.manual_seed(SEED)
    eager = LlamaForCausalLM(llama_config(sizes, max_len)).to(device)
    mkt.BACKEND = backend
    return {"eager": eager, "maskkern": mkt.apply(copy.deepcopy(eager))}


def train_step(model: torch.nn.Module, batch: dict) -> Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def name(plan: tuple, layout: str) -> str:
    """A case's name: the model's sizes, the layout and the batch."""
    sizes, B, L, _ = plan
    model = f"h={sizes['hidden_size']} layers={sizes['num_hidden_layers']} vocab={sizes['vocab_size']}"
    return f"llama {model} {layout} B={B} L={L}"


def cases(ctx: Context) -> list[Case]:
    sizes, B, L, _ = _plan(ctx)
    tokens = int(_generator(B, L, SEED)[1].sum())  # the real tokens of the batch, in either layout
    backend = ctx.maskkern_backends(nocache=False)[0][1]
    config = sizes | {"heads": 8, "kv_heads": 4, "batch": B, "max_len": L, "dtype": "float32"}
    config |= {"transformers": transformers.__version__}

    def inputs(layout: str):
        def make() -> dict:
            padded = padded_batch(sizes["vocab_size"], B, L, SEED, ctx.device)
            batch = padded if layout == PADDED else packed_batch(padded)
            # Built on first use (the providers share them: one eager model, one maskkern twin).
            return dict(batch=batch, padded=padded, models={})

        return make

    def provider(name: str, layout: str | None = None):
        def step(batch: dict, padded: dict, models: dict) -> Tensor:
            if not models:
                models.update(build(sizes, L, ctx.device, backend))
            return train_step(models[name], padded if layout == PADDED else batch)

        return step

    out = []
    for layout in (PADDED, PACKED):
        providers = {"maskkern": provider("maskkern"), "eager": provider("eager")}
        if layout == PACKED:
            providers[PADDED_BASELINE] = provider("maskkern", PADDED)
        out.append(
            Case(
                name=name(_plan(ctx), layout),
                x_name="layout",
                x=layout,
                config=config | {"layout": layout},
                inputs=inputs(layout),
                providers=providers,
                reference=provider("eager"),
                modes=("step",),
                tol=(1e-5, 1e-5),
                baselines=(PADDED_BASELINE,) if layout == PACKED else (),
                work={"step": tokens},
                work_unit="tokens",
            )
        )
    return out


def lockstep(ctx: Context, steps: int) -> float:
    """Max |Δloss| of the two models trained in lockstep (AdamW, a new padded batch per step)."""
    sizes, B, L, _ = _plan(ctx)
    models = build(sizes, L, ctx.device, ctx.maskkern_backends(nocache=False)[0][1])
    opts = {n: torch.optim.AdamW(m.parameters(), lr=LR) for n, m in models.items()}
    worst = 0.0
    for i in range(steps):
        batch = padded_batch(sizes["vocab_size"], B, L, SEED + 1 + i, ctx.device)
        losses = {}
        for name, model in models.items():
            losses[name] = float(train_step(model, batch))
            opts[name].step()
        worst = max(worst, abs(losses["eager"] - losses["maskkern"]))
        print(
            f"[{KERNEL}] step {i + 1}: eager {losses['eager']:.6f} maskkern {losses['maskkern']:.6f}",
            file=sys.stderr,
        )
    return worst


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """The issue's four, set at FULL (module docstring); tokens/s ratios are time ratios (the same
    tokens on both sides)."""
    plan = _plan(ctx)
    steps = plan[3]
    padded, packed = results.get(name(plan, PADDED)), results.get(name(plan, PACKED))
    speed = padded and padded.ratio("eager", "step")
    memory = None
    if padded is not None:
        m, e = (padded.times.get((p, "step")) for p in ("maskkern", "eager"))
        memory = m and e and m.peak_bytes and e.peak_bytes and m.peak_bytes / e.peak_bytes
    packed_speed = packed and ratio(packed.p50(PADDED_BASELINE, "step"), packed.p50("maskkern", "step"))
    # The lockstep run is a measurement: only after the cases ran (not for a plan).
    agreement = lockstep(ctx, steps) if padded is not None and padded.times else None

    def at(layout: str, suffix: str = "") -> dict[str, str]:
        return {
            "set_at": name(FULL, layout) + suffix.format(FULL[3]),
            "measured_at": name(plan, layout) + suffix.format(steps),
        }

    label = f"{KERNEL} {name(plan, PADDED)}"
    return [
        Target(f"{label}: step tokens/s, maskkern / sdpa + HF loss", speed, 1.8, **at(PADDED)),
        Target(f"{label}: step peak memory, maskkern / sdpa + HF loss", memory, 0.55, "<=", **at(PADDED)),
        Target(
            f"{label}: max |Δloss| over {steps} AdamW steps in lockstep",
            agreement,
            AGREE_TOL,
            "<=",
            "",
            **at(PADDED, ", {} steps"),
        ),
        Target(
            f"{KERNEL} {name(plan, PACKED)}: maskkern tokens/s, packed / padded",
            packed_speed,
            1.0,
            **at(PACKED),
        ),
    ]


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
