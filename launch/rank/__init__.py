"""What runs in each rank process before and around training: its place in the job, the scheduler's environment,
CPU threads, the health gate, and the worker entry point."""
