"""Site profiles from outside the repository: GPTLAUNCH_SITE_DIR on Hydra's search path (gptlaunch_site.py)."""
