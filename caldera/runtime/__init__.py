"""Runtime paths for compressed models."""
