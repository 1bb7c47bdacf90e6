"""cluster=slurm: each sweep point is a Slurm job submitted through submitit (backend.py)."""
