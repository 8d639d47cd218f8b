"""The graph: one index of producers and consumers, and the declared passes that copies are made with."""
