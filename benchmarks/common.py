"""Helpers for benchmarks: compose a config as `python -m launch` would, and save results as JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from launch import launch_config
from launch.launch_config import LaunchConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def compose_config(overrides: list[str]) -> LaunchConfig:
    """The config `python -m launch OVERRIDES` would run, reading the shared corpus when the repo has no copy."""
    text = REPO / "data" / "tinyshakespeare" / "input.txt"
    data = [f"data.text_path={text if text.exists() else SHARED_TEXT}"]  # absolute: planning refuses relative
    launch_config.register()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return launch_config.parse(compose("config", overrides=data + overrides))


def save_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    results = {"machine": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    path.write_text(json.dumps(results, indent=1))
    return path
