"""The segmentation model: 3D U-Net, losses, metrics, sliding-window inference, weight files."""
