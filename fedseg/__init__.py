"""fedseg: privacy-preserving federated training of CT segmentation models on FEDn."""

__version__ = "0.1.0"
