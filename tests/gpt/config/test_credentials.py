"""No credential is written into a run folder: a config that holds one is refused, in one line that hides it, before
anything runs (the run folder's config.yaml and the batch script keep every key, readable by whoever reads them)."""
from __future__ import annotations

import pytest

from launch import launch_config
from gpt.errors import ConfigError
from helpers import compose


@pytest.mark.parametrize("overrides, key", [
    (("cluster=slurm", "+cluster.env.WANDB_API_KEY=k3y"), "cluster.env.WANDB_API_KEY"),
    (("cluster=srun", "+cluster.env.MLFLOW_TRACKING_PASSWORD=k3y"), "cluster.env.MLFLOW_TRACKING_PASSWORD"),
    (("cluster=slurm", "cluster.setup=['module load x; export HF_TOKEN=k3y']"), "cluster.setup"),
    (("tracking.uri=https://me:k3y@mlflow.example.org:5000",), "tracking.uri"),
    # keys cluster=local does not read: refused as credentials before that refusal could show their values
    (("+cluster.env.WANDB_API_KEY=k3y",), "cluster.env.WANDB_API_KEY"),
    (("cluster.setup=['export HF_TOKEN=k3y']",), "cluster.setup"),
])
def test_a_credential_in_the_config_is_refused_without_showing_it(overrides, key):
    with pytest.raises(ConfigError) as e:
        launch_config.parse(compose(*overrides))
    assert e.value.key == key and "k3y" not in str(e.value) and "\n" not in str(e.value)


def test_what_keeps_the_credential_out_of_the_files_is_taken():
    launch_config.parse(compose("cluster=slurm", "+cluster.env.TOKENIZERS_PARALLELISM='false'", "+cluster.env.NCCL_IB_HCA=mlx5",
                       "cluster.setup=['export WANDB_API_KEY=$(cat ~/.wandb-key)', 'export HF_TOKEN=\"$MY_TOKEN\"']",
                       "tracking.uri=https://mlflow.example.org:5000"))
