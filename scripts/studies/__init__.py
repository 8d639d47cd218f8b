"""Helpers of the studies in scripts/ (network builders, the MNIST reader); not part of the library."""
