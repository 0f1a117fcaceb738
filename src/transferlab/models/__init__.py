"""Models: backbone registry, weights loading, heads and the LightningModule."""
