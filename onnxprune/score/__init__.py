"""Scorers: how much each weight or unit costs to remove, one small class per method."""
