"""The public ops, one module each (function, custom ops, autograd, module class)."""

from .attention import attention, varlen_attention
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .masked_cross_entropy import MaskedCrossEntropyLoss, masked_cross_entropy
from .masked_softmax import MaskedSoftmax, masked_softmax
from .pad_embedding import PadEmbedding, pad_embedding

__all__ = [
    "LinearCrossEntropyLoss",
    "MaskedCrossEntropyLoss",
    "MaskedSoftmax",
    "PadEmbedding",
    "attention",
    "linear_cross_entropy",
    "masked_cross_entropy",
    "masked_softmax",
    "pad_embedding",
    "varlen_attention",
]
