"""Patient-level DP-SGD, privacy accounting and the per-clinic privacy ledger."""
