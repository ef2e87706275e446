"""Evaluation: perplexity, the quality report."""
