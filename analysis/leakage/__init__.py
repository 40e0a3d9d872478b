"""Measured privacy leakage: update inversion, membership inference, canary audits."""
