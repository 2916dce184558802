"""Repair without training: least-squares maps folded into the weights."""
