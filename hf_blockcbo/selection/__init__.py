"""Choosing blocks: baseline scorers, validation selection, comparison and diagnosis."""
