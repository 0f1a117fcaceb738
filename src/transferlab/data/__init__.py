"""Data: datasets (digits, CIFAR-10, ImageFolder), transforms and the LightningDataModule."""
