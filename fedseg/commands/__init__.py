"""Click command groups of the ``fedseg`` CLI, one module per group."""
