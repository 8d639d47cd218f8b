"""What can be pruned: layers, how their weights are stored, the protected output, unit groups, and why not."""
