"""No credential in a config: the resolved config is written into the run folder (config.yaml) and into the batch
script, where other users of a shared file system may read it. A tracker's key stays in the environment of the
shell that launches (the scheduler passes it into the job) or in the tool's own login file (`wandb login`, ~/.netrc).
Torch-free."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from gpt.errors import ConfigError

# WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...
CREDENTIAL = re.compile(r"(^|_)(API_?KEY|ACCESS_KEY|TOKEN|PASSWORD|PASSWD|SECRET)($|_)", re.IGNORECASE)
# a shell assignment of a literal value (`export NAME=$(cat FILE)` or `NAME="$VAR"` keep the value out of the file)
ASSIGNMENT = re.compile(r"(?:^|[\s;&|])(?:export\s+)?([A-Za-z_]\w*)=(?![\"']?\$)\S")
HIDDEN = "(hidden)"  # the message shows the key, never the credential
WHERE = ("no credential: the run folder's config.yaml keeps it, readable by whoever can read the folder; export "
         "it in the shell that launches (Slurm passes it into the job) or use the tool's own login")


def is_credential(name: str) -> bool:
    return bool(CREDENTIAL.search(name))


def check_env(key: str, env: dict) -> None:
    """`key`.NAME: a variable the ranks get, written into the config."""
    for name in env:
        if is_credential(str(name)):
            raise ConfigError(f"{key}.{name}", HIDDEN, WHERE)


def check_lines(key: str, lines: tuple[str, ...]) -> None:
    """Shell lines written into the batch script: none assigns a credential a literal value."""
    for line in lines:
        for name in ASSIGNMENT.findall(line):
            if is_credential(name):
                raise ConfigError(key, f"{name}={HIDDEN}", f"{WHERE} (or read it from a file: "
                                                           f"export {name}=$(cat FILE))")


def check_uri(key: str, uri: str | None) -> None:
    """A URI with a password in it (https://user:password@host)."""
    if uri and urlsplit(uri).password is not None:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
        shown = parts._replace(netloc=f"{parts.username}:{HIDDEN}@{host}").geturl()
        raise ConfigError(key, shown, f"{WHERE}: MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
