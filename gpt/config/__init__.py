"""The run's configuration: the typed sections of configs/, checked before anything runs (torch-free)."""
