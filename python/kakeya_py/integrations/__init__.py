"""Integrations of the kakeya codec into inference engines (vLLM)."""
