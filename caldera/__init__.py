"""caldera: CALDERA (Q + L·R) compression of LLM linear layers.

Importing this package is cheap: it does not import ``max`` or initialise CUDA.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``caldera.load`` imports torch and transformers on first use only."""
    if name == "load":
        from caldera.runtime.load import load

        return load
    raise AttributeError(f"module 'caldera' has no attribute {name!r}")
