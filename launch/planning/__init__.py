"""Planning a sweep point before anything runs: validation, layout, budget, labels (torch-free)."""
