"""Drop-in modules: each is constructed like the torch module it replaces."""

from .ops.linear_cross_entropy import LinearCrossEntropyLoss
from .ops.masked_cross_entropy import MaskedCrossEntropyLoss
from .ops.masked_softmax import MaskedSoftmax
from .ops.pad_embedding import PadEmbedding

__all__ = ["LinearCrossEntropyLoss", "MaskedCrossEntropyLoss", "MaskedSoftmax", "PadEmbedding"]
