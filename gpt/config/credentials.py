"""No credential in a config: the resolved config is written into the run folder (config.yaml) and into the batch
script, where other users of a shared file system may read it. A tracker's key stays in the environment of the
shell that launches (the scheduler passes it into the job) or in the tool's own login file (`wandb login`, ~/.netrc).
Torch-free."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from gpt.errors import ConfigError

# WANDB_API_KEY, WANDB_KEY, MLFLOW_TRACKING_PASSWORD, PGPASSWORD, HF_TOKEN, GITHUB_PAT, SSH_PRIVATE_KEY,
# AWS_SECRET_ACCESS_KEY, CLIENT_SECRET, ...: PASSWORD, PASSWD and SECRET anywhere in the name; the shorter words only as
# a part of it (TOKENIZERS_PARALLELISM and PATH are no credentials)
CREDENTIAL = re.compile(r"PASSWORD|PASSWD|SECRET|PRIVATE_?KEY|(^|_)(API_?KEY|ACCESS_?KEY|KEY|TOKEN|PAT|PWD|AUTH)($|_)",
                        re.IGNORECASE)
# where a credential is kept, not the credential: SSH_KEY_FILE, --token-file, --password-stdin
LOCATION = re.compile(r"_(FILE|PATH|DIR|STDIN|FD)$", re.IGNORECASE)
# a literal value: not a variable or command substitution ($X, "$X", $(cat F)), a redirect or another option
LITERAL = r"(?![\"']?\$)(?![-<|])\S"
# a shell assignment of a literal value (`export NAME=$(cat FILE)` or `NAME="$VAR"` keep the value out of the file)
ASSIGNMENT = re.compile(r"(?:^|[\s;&|])(?:export\s+)?([A-Za-z_]\w*)=" + LITERAL)
# an option given a literal value: `huggingface-cli login --token abc`, `--password=abc`, `-p abc` is left alone
OPTION = re.compile(r"(?:^|\s)--([A-Za-z][\w-]*)(?:=|\s+)" + LITERAL)
# a URL with a password in it (https://user:password@host), unless the password is a variable
URL_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*://[^\s/:@]*):(?!\$)[^\s/@]+@", re.IGNORECASE)
HIDDEN = "(hidden)"  # the message shows the key, never the credential
WHERE = ("no credential: the run folder's config.yaml keeps it, readable by whoever can read the folder; export "
         "it in the shell that launches (Slurm passes it into the job) or use the tool's own login")


def is_credential(name: str) -> bool:
    name = name.replace("-", "_")
    return bool(CREDENTIAL.search(name)) and not LOCATION.search(name)


def check_env(key: str, env: dict) -> None:
    """`key`.NAME: a variable the ranks get, written into the config: none is named as a credential, and none holds a
    URL with a password."""
    for name, value in env.items():
        if is_credential(str(name)) or URL_PASSWORD.search(str(value)):
            raise ConfigError(f"{key}.{name}", HIDDEN, WHERE)


def line_credential(line: str) -> str | None:
    """What of a shell line passes a credential as a literal (NAME=, --NAME or a URL's password), shown hidden."""
    for name in ASSIGNMENT.findall(line):
        if is_credential(name):
            return f"{name}={HIDDEN}"
    for name in OPTION.findall(line):
        if is_credential(name):
            return f"--{name} {HIDDEN}"
    if found := URL_PASSWORD.search(line):
        return f"{found.group(1)}:{HIDDEN}@"
    return None


def check_lines(key: str, lines: tuple[str, ...]) -> None:
    """Shell lines written into the batch script: none passes a credential as a literal value."""
    for line in lines:
        if shown := line_credential(line):
            raise ConfigError(key, shown, f"{WHERE} (or read it from a file: export NAME=$(cat FILE), "
                                          "--token \"$NAME\")")


def redacted(config: Any, path: str = "") -> Any:
    """`config` (plain dicts and lists) as a tracker may keep it: the value of a key named as a credential, and of
    the notify keys (a webhook's URL is its key), hidden; a literal credential in any string hidden too."""
    if isinstance(config, dict):
        return {k: _hidden(v, f"{path}{k}") for k, v in config.items()}
    if isinstance(config, list):
        return [redacted(v, path) for v in config]
    if isinstance(config, str) and line_credential(config):
        return HIDDEN
    return config


def _hidden(value: Any, key: str) -> Any:
    secret = is_credential(key.rpartition(".")[2]) or key in SECRET_KEYS
    return HIDDEN if secret and value is not None else redacted(value, f"{key}.")


SECRET_KEYS = frozenset({"notify.webhook", "notify.command"})  # who knows them can post as the run


def check_uri(key: str, uri: str | None) -> None:
    """A URI with a password in it (https://user:password@host)."""
    if uri and urlsplit(uri).password is not None:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
        shown = parts._replace(netloc=f"{parts.username}:{HIDDEN}@{host}").geturl()
        raise ConfigError(key, shown, f"{WHERE}: MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
