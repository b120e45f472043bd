"""Shared pieces of the how-to steps toolkit: prompt format, models, run bookkeeping, LLM client."""
