"""Measuring models: perplexity and multiple choice, lm-evaluation-harness, speed and memory."""
