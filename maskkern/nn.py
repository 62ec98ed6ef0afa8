"""Drop-in modules: each is constructed like the torch module it replaces."""

from .ops.masked_softmax import MaskedSoftmax

__all__ = ["MaskedSoftmax"]
