"""The public ops, one module each (function, custom ops, autograd, module class)."""

from .attention import attention
from .masked_softmax import MaskedSoftmax, masked_softmax
from .pad_embedding import PadEmbedding, pad_embedding

__all__ = ["MaskedSoftmax", "PadEmbedding", "attention", "masked_softmax", "pad_embedding"]
