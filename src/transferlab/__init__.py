"""transferlab: fine-tune pretrained image classifiers with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
