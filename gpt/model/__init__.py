"""The GPT model and its analytic FLOPs and parameter counts."""
