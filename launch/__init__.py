"""Turning a config into processes: the Hydra app, validation and planning, cluster backends, rendezvous."""
