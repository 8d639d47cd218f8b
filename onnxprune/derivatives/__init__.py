"""Derivatives of the protected output: the instrumented copy, the gradient engines, and the sums over the
calibration data that the scorers read (per weight and per unit)."""
