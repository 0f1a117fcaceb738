"""Fine-tuning: which parameters train (freeze strategies) and how (optimizer, scheduler)."""
