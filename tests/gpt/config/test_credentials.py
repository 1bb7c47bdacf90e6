"""No credential is written into a run folder: a config that holds one is refused, in one line that hides it, before
anything runs (the run folder's config.yaml and the batch script keep every key, readable by whoever reads them)."""
from __future__ import annotations

import pytest

from gpt.config.credentials import HIDDEN, redacted
from gpt.config.parse import to_plain
from launch import launch_config
from gpt.errors import ConfigError
from helpers import compose, spread


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


@pytest.mark.parametrize("overrides, key", spread("overrides, key", [
    (("cluster=slurm", "+cluster.env.PGPASSWORD=k3y"), "cluster.env.PGPASSWORD"),
    (("cluster=slurm", "+cluster.env.SSH_PRIVATE_KEY=k3y"), "cluster.env.SSH_PRIVATE_KEY"),
    (("cluster=slurm", "+cluster.env.WANDB_KEY=k3y"), "cluster.env.WANDB_KEY"),
    (("cluster=slurm", "+cluster.env.GITHUB_PAT=k3y"), "cluster.env.GITHUB_PAT"),
    (("cluster=slurm", "+cluster.env.PIP_INDEX_URL=https://me:k3y@pypi.example.org/simple"), "cluster.env.PIP_INDEX_URL"),
    (("cluster=slurm", "cluster.setup=['export PGPASSWORD=k3y']"), "cluster.setup"),
    (("cluster=slurm", "cluster.setup=['huggingface-cli login --token k3y']"), "cluster.setup"),
    (("cluster=slurm", "cluster.setup=['mysql --password=k3y -e \"select 1\"']"), "cluster.setup"),
    (("cluster=slurm", "cluster.setup=['pip install --index-url https://me:k3y@pypi.example.org/simple x']"),
     "cluster.setup"),
], 3))
def test_credentials_a_name_rule_missed_are_refused_without_showing_them(overrides, key):
    """PGPASSWORD, SSH_PRIVATE_KEY, WANDB_KEY and GITHUB_PAT passed the old name rule, as did a token given as an
    option (`--token X`) and a URL's password."""
    with pytest.raises(ConfigError) as e:
        launch_config.parse(compose(*overrides))
    assert e.value.key == key and "k3y" not in str(e.value) and "\n" not in str(e.value)


def test_where_a_credential_is_kept_is_no_credential():
    launch_config.parse(compose("cluster=slurm", "+cluster.env.SSH_KEY_FILE=/home/me/.ssh/id", "+cluster.env.KEEP_N=1",
                                "cluster.setup=['huggingface-cli login --token \"$HF_TOKEN\"', "
                                "'docker login --password-stdin < ~/.pw', 'tool --token-file ~/.tok', "
                                "'pip install --index-url https://$USER:$PIP_PW@pypi.example.org/simple x']"))


def test_the_config_a_tracker_keeps_hides_secrets_and_nothing_else():
    """The whole config goes to W&B and MLflow: the notify keys (a webhook's URL is its key) and any literal
    credential are hidden; every other value of the default tree is kept."""
    run = launch_config.parse(compose("cluster=slurm", "notify.webhook=https://hooks.example.org/T0/B1/s3cret",
                                      "notify.command='curl -d @- https://ntfy.sh/s3cret'"))
    plain = to_plain(run)
    plain["cluster"]["setup"] = ["git clone https://me:k3y@git.example.org/x"]  # as if the check had been skipped
    shown = redacted(plain)
    assert "s3cret" not in str(shown) and "k3y" not in str(shown)
    assert shown["notify"] == {**plain["notify"], "webhook": HIDDEN, "command": HIDDEN}
    assert shown["cluster"]["setup"] == [HIDDEN]
    del plain["notify"], shown["notify"], plain["cluster"]["setup"], shown["cluster"]["setup"]
    assert shown == plain
