"""caldera: CALDERA (Q + L·R) compression of LLM linear layers.

Importing this package is cheap: it does not import ``max`` or initialise CUDA.
"""

__version__ = "0.1.0"
