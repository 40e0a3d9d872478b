"""Builds the initial global model (seed) from the compute package's model code."""
