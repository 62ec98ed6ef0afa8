"""maskkern: fused mask kernels for PyTorch (masked softmax, fused masked attention, pad-aware
embedding, masked cross-entropy) on Triton, C++/CUDA and C++ CPU backends, checked against eager PyTorch.

``import maskkern as mk``; see DESIGN.md for the contract and README.md for examples.
"""

from . import _backend

_backend._load_extension()  # loads maskkern._C (its TORCH_LIBRARY) before the ops attach fakes
_backend._load_cpu_kernels()  # and the CPU kernels of this CPU's instruction set

from . import masks, nn, reference  # noqa: E402
from ._backend import BackendStatus, backends  # noqa: E402
from .memory import empty_cache  # noqa: E402
from .ops import (  # noqa: E402
    attention,
    linear_cross_entropy,
    masked_cross_entropy,
    masked_softmax,
    pad_embedding,
    varlen_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "attention",
    "backends",
    "empty_cache",
    "linear_cross_entropy",
    "masked_cross_entropy",
    "masked_softmax",
    "masks",
    "nn",
    "pad_embedding",
    "reference",
    "varlen_attention",
]
