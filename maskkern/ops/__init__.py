"""The public ops, one module each (function, custom ops, autograd, module class)."""

from .attention import attention
from .masked_softmax import MaskedSoftmax, masked_softmax

__all__ = ["MaskedSoftmax", "attention", "masked_softmax"]
