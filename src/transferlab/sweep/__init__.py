"""Sweeps: the table of a sweep's jobs (`transferlab summary`)."""
