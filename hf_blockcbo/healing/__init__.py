"""Healing by distillation: the trainer, its config and the teacher cache."""
