"""The two strategies of the pruner: weights (zeros and bias shifts) and units (whole units sliced away)."""
