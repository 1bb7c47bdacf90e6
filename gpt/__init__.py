"""What runs inside each rank: model, data, trainer, parallel strategies, checkpointing, metrics."""
