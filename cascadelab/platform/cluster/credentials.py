"""Credentials stay out of a job's environment and out of MLflow params.

A Ray job's ``runtime_env.env_vars`` are stored with the job and shown by the dashboard and the Jobs
API (``ray job list``) to everyone who can reach them; a run's params are shown by the MLflow UI to
everyone who may read the experiment. Neither is a place for a password. Credentials reach the cluster
the way MLflow and the cloud SDKs read them: as environment variables of the processes on every node,
set where ``ray start`` runs (a root-only file sourced before it on launcher clusters, a Kubernetes
Secret through ``env.valueFrom`` on KubeRay), so every driver and worker inherits them without the job
naming them. deploy/README.md ("MLflow authentication") describes the setup.

* :func:`check_job_env` refuses a job env that carries a credential (``cascadelab submit --env ...``
  or a pass-through variable), with one line naming the variable.
* :func:`check_job_argv` refuses job arguments that embed a password in a URL
  (``--set tracking.uri=http://user:secret@head:5000``): the entrypoint is shown like the env.
* :func:`scrub_params` redacts credentials from a dict about to be logged as MLflow params.

A variable is a credential when its name is in :data:`CREDENTIAL_ENV` or ends with one of
:data:`CREDENTIAL_SUFFIXES` (case-insensitive); a value is one when it is a URL whose user info holds a
password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cascadelab.platform.config import ConfigError

#: Variables that hold secrets, by the library that reads them. ``MLFLOW_TRACKING_USERNAME`` is not
#: secret by itself, but it is one half of the pair the nodes provide: a job-level username would pair
#: with the node's password for another user.
CREDENTIAL_ENV: tuple[str, ...] = (
    # MLflow clients (basic auth, bearer token) and the basic-auth server's own secrets
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    # Ray token auth (the cluster's token file holds it on every node)
    "RAY_AUTH_TOKEN",
    # object stores behind train.storage_path and MLflow artifacts
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    # hosted services a job might be pointed at
    "DATABRICKS_TOKEN",
    "HF_TOKEN",
    "WANDB_API_KEY",
)

#: Name endings that mark a secret whatever the prefix (``*_PASSWORD``, ``*_TOKEN``, ...); a bare
#: ``PASSWORD`` or ``TOKEN`` counts as well.
CREDENTIAL_SUFFIXES: tuple[str, ...] = (
    "_PASSWORD",
    "_PASSWD",
    "_TOKEN",
    "_SECRET",
    "_SECRET_KEY",
    "_SECRET_ACCESS_KEY",
    "_API_KEY",
    "_ACCESS_KEY",
    "_PRIVATE_KEY",
    "_CONNECTION_STRING",
)

#: What :func:`scrub_params` puts in place of a secret.
REDACTED = "<redacted>"

_HOW = ("set {what} on the cluster's nodes instead (the environment `ray start` runs in: the sourced "
        "credentials file, or a Kubernetes Secret in the pod spec; deploy/README.md, \"MLflow authentication\")")

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']+")


def is_credential_name(name: str) -> bool:
    """Whether an environment variable (or the last ``.`` part of a config key) names a secret."""
    key = name.rsplit(".", 1)[-1].strip().upper()
    return key in CREDENTIAL_ENV or f"_{key}".endswith(CREDENTIAL_SUFFIXES)


def _redact_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:<redacted>@host/...``; other text unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a port that is not a number
        return url
    if not password:
        return url
    netloc = f"{parts.username or ''}:{REDACTED}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it redacted."""
    return _URL_RE.sub(lambda m: _redact_url(m.group(0)), text)


def has_url_password(text: str) -> bool:
    """Whether ``text`` contains a URL whose user info holds a password."""
    return redact_urls(text) != text


def check_job_env(env: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` (one line, naming the variable) if ``env`` — the ``env_vars`` a job is
    submitted with — carries a credential: a name :func:`is_credential_name` flags, or a value holding
    a URL with a password."""
    for key in sorted(env):
        if is_credential_name(key):
            raise ConfigError(f"env var {key} is a credential and is not forwarded to the job: a job's env "
                              f"vars are shown in the Ray dashboard; {_HOW.format(what='it')}")
        if has_url_password(str(env[key])):
            raise ConfigError(f"env var {key} holds a URL with a password ({redact_urls(str(env[key]))}): a "
                              f"job's env vars are shown in the Ray dashboard; drop the password from the URL "
                              f"and {_HOW.format(what='the credentials')}")


def check_job_argv(argv: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if a job argument holds a URL with a password
    (``--set tracking.uri=http://user:secret@head:5000``): the entrypoint is shown in the dashboard."""
    for arg in argv:
        if has_url_password(arg):
            raise ConfigError(f"job argument '{redact_urls(arg)}' holds a URL with a password: the job's "
                              f"command line is shown in the Ray dashboard and logged as MLflow params; drop "
                              f"the password from the URL and {_HOW.format(what='the credentials')}")


def scrub_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` (flattened ``section.key`` -> value) safe to log: the value of a key whose
    last part is a credential name becomes :data:`REDACTED`, and passwords in URLs are redacted."""
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if is_credential_name(key) and value not in (None, ""):
            clean[key] = REDACTED
        elif isinstance(value, str):
            clean[key] = redact_urls(value)
        else:
            clean[key] = value
    return clean
