"""Torch-only math: quantizers, incoherence, LDLQ, low rank, the CALDERA loop, metrics.

No file I/O, no CLI; every function works on the device of its inputs.
"""

from caldera.core.decompose import Decomposition, decompose
from caldera.core.ldlq import HessianError
from caldera.core.quantize import QuantizedTensor, quantize

__all__ = ["Decomposition", "HessianError", "QuantizedTensor", "decompose", "quantize"]
