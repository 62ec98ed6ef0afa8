"""A small byte-level decoder-only Transformer LM, written once with its three mask patterns in
either spelling, and batches of real, ragged text: the lines of the Python standard library.

``TinyLM(cfg, impl="eager")`` is what people write today; ``impl="maskkern"`` swaps exactly three
things and nothing else (same parameters, same state_dict):

    embedding  nn.Embedding(V, d, padding_idx=PAD)
            -> mk.nn.PadEmbedding(V, d, padding_idx=PAD)
    attention  F.softmax((q @ k.mT * s).masked_fill(~keep, -inf), -1) @ v
            -> mk.attention(q, k, v, lengths=lengths, causal=True)
    loss       F.cross_entropy(head(h), t, ignore_index=PAD)
            -> mk.nn.LinearCrossEntropyLoss(ignore_index=PAD)(h, head.weight, t)  (no logits held)

Padding, and what each spelling does with it. A batch is B lines padded with PAD to the longest.
The eager keep-mask is the usual key-padding AND causal mask, ``(ids != PAD)[:, None, None, :] &
tril``; maskkern gets ``lengths`` and ``causal=True``, the same mask computed in-kernel. Under it a
padded *query* sees the real keys of its line (every line has at least one token, so no row is
empty and eager gives no NaN) and its output is garbage that nothing reads: real queries never see
a padded key, and the loss ignores padded targets (``ignore_index=PAD``). The two spellings are
therefore the same function at every position, padded ones included, and their losses and
gradients agree to rounding.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import maskkern as mk

PAD = 256  # byte values are 0..255; the vocabulary is the 256 bytes + PAD
VOCAB = 257


@dataclass(frozen=True)
class LMConfig:
    """Model size (dim must divide by heads) and the longest input, in bytes."""

    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_len: int = 128


# --- data ---------------------------------------------------------------------------------------


def stdlib_lines(max_len: int) -> list[bytes]:
    """The non-blank lines (with their newline) of the stdlib's top-level .py files, in sorted file
    order, each cut to max_len + 1 bytes (max_len inputs and their next-byte targets). Every line
    has at least 2 bytes, so at least one input token: no line is all padding."""
    root = Path(os.path.dirname(os.__file__))
    lines = []
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes().splitlines(keepends=True)
        lines += [line[: max_len + 1] for line in text if line.strip() and len(line) >= 2]
    return lines


def make_batch(lines: list[bytes], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(ids, targets, lengths): ids (B, L) = each line but its last byte, targets = each line but
    its first byte, both padded with PAD to the longest line of the batch; lengths (B,) int64."""
    L = max(len(line) for line in lines) - 1
    ids = torch.full((len(lines), L + 1), PAD, dtype=torch.int64)
    for i, line in enumerate(lines):
        ids[i, : len(line)] = torch.frombuffer(bytearray(line), dtype=torch.uint8)
    lengths = torch.tensor([len(line) - 1 for line in lines])
    inputs = ids[:, :-1].masked_fill(torch.arange(L) >= lengths[:, None], PAD)
    return inputs.to(device), ids[:, 1:].to(device), lengths.to(device)


def batches(
    lines: list[bytes], batch: int, seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """An endless stream of batches of ``batch`` lines drawn at random (seeded) from ``lines``."""
    rng = random.Random(seed)
    while True:
        yield make_batch(rng.sample(lines, batch), device)


# --- the model ----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal multi-head self-attention over the real tokens of each line."""

    def __init__(self, cfg: LMConfig, impl: str, backend: str | None) -> None:
        super().__init__()
        self.heads, self.impl, self.backend = cfg.heads, impl, backend
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, keep: Tensor | None, lengths: Tensor) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.impl == "maskkern":
            y = mk.attention(q, k, v, lengths=lengths, causal=True, backend=self.backend)
        else:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            y = F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: LMConfig, impl: str, backend: str | None) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg, impl, backend)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x: Tensor, keep: Tensor | None, lengths: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), keep, lengths)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level decoder-only LM; ``impl`` is "eager" or "maskkern" (see the module doc), ``backend``
    maskkern's backend (None: the default for the device)."""

    def __init__(self, cfg: LMConfig, impl: str = "eager", backend: str | None = None) -> None:
        super().__init__()
        if impl not in ("eager", "maskkern"):
            raise ValueError(f"impl must be 'eager' or 'maskkern', got {impl!r}")
        self.cfg, self.impl = cfg, impl
        if impl == "maskkern":
            self.embed = mk.nn.PadEmbedding(VOCAB, cfg.dim, padding_idx=PAD, backend=backend)
            self.criterion = mk.nn.LinearCrossEntropyLoss(ignore_index=PAD, backend=backend)
        else:
            self.embed = nn.Embedding(VOCAB, cfg.dim, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, impl, backend) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)

    def hidden(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, L, dim) final hidden states of ids (B, L) padded with PAD past lengths (B,)."""
        L = ids.shape[1]
        keep = None
        if self.impl == "eager":
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
            keep = (ids != PAD)[:, None, None, :] & causal
        x = self.embed(ids) + self.pos(torch.arange(L, device=ids.device))
        for block in self.blocks:
            x = block(x, keep, lengths)
        return self.ln(x)

    def loss(self, ids: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
        """Mean next-byte cross-entropy over the real (non-PAD) targets."""
        h = self.hidden(ids, lengths).flatten(0, 1)
        if self.impl == "maskkern":
            return self.criterion(h, self.head.weight, targets.flatten())
        return F.cross_entropy(self.head(h), targets.flatten(), ignore_index=PAD)


def grad_step(model: TinyLM, ids: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
    """Forward and backward of one batch; the gradients are left in ``.grad``, the loss returned."""
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, targets, lengths)
    loss.backward()
    return loss.detach()


def maskkern_twin(eager: TinyLM, backend: str | None = None) -> TinyLM:
    """A maskkern TinyLM with ``eager``'s parameters, on its device: it loads the eager state_dict
    (strict: the same names and shapes)."""
    twin = TinyLM(eager.cfg, "maskkern", backend).to(eager.head.weight.device)
    twin.load_state_dict(eager.state_dict())
    return twin
