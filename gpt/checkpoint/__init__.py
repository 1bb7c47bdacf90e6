"""Checkpoints: their format on disk, atomic writes and retention, and when to save."""
