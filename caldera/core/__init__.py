"""Torch-only math: quantizers, incoherence, LDLQ, low rank, the CALDERA loop, metrics.

No file I/O, no CLI; every function works on the device of its inputs. Import from the submodules
(``caldera.core.decompose.decompose``).
"""
