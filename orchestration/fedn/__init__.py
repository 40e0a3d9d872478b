"""FEDn 0.33.0 glue: process launch and the workarounds for its known bugs."""
