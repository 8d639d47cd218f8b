"""Edits of the model: zeros and bias shifts (rewrite), units folded and sliced away (slicing)."""
