"""The training loop of one rank and what it writes: the trainer, optimizer, metrics, run records."""
