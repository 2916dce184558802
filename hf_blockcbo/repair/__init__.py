"""Repair without training: least-squares maps folded into the weights."""

# how each calibration token's fit error is weighed (`repair_weighting`); here, not in least_squares, so that the CLI
# lists the choices without importing torch
REPAIR_WEIGHTINGS = ("uniform", "relative")
