"""Checks of a model version: it runs and is finite (validate), how good and how fast it is (evaluate, timing)."""
