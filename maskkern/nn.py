"""Drop-in modules: each is constructed like the torch module it replaces."""

from .ops.masked_cross_entropy import MaskedCrossEntropyLoss
from .ops.masked_softmax import MaskedSoftmax
from .ops.pad_embedding import PadEmbedding

__all__ = ["MaskedCrossEntropyLoss", "MaskedSoftmax", "PadEmbedding"]
