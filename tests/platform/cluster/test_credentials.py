"""Credentials never reach a job's env, its command line or MLflow params (no Ray, no MLflow)."""

from __future__ import annotations

import pytest

from cascadelab.platform.cluster.credentials import (
    CREDENTIAL_ENV,
    REDACTED,
    check_job_argv,
    check_job_env,
    has_url_password,
    is_credential_name,
    redact_urls,
    scrub_params,
)
from cascadelab.platform.cluster.jobs import PASSTHROUGH_ENV
from cascadelab.platform.cluster.storage import SHARED_STORAGE_ENV
from cascadelab.platform.config import ConfigError


@pytest.mark.parametrize("name", [*CREDENTIAL_ENV, "mlflow_tracking_password", "MY_SERVICE_TOKEN",
                                  "DB_PASSWORD", "OPENAI_API_KEY", "GCS_PRIVATE_KEY", "tracking.password"])
def test_credential_names(name):
    assert is_credential_name(name)


@pytest.mark.parametrize("name", ["RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "CASCADELAB_SHARED_STORAGE",
                                  "TOKENIZERS_PARALLELISM", "AWS_REGION", "MLFLOW_TRACKING_INSECURE_TLS",
                                  "tracking.uri", "objective.tau", "data.max_eval_rows"])
def test_ordinary_names_are_not_credentials(name):
    assert not is_credential_name(name)


def test_the_variables_submit_passes_through_are_not_credentials():
    for name in (*PASSTHROUGH_ENV, SHARED_STORAGE_ENV):
        assert not is_credential_name(name), name


def test_ordinary_job_env_passes():
    check_job_env({"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": "http://10.0.0.10:5000",
                   "CASCADELAB_SHARED_STORAGE": "1"})
    check_job_env({})


@pytest.mark.parametrize("name", ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                                  "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"])
def test_a_credential_in_the_job_env_is_one_line_naming_it(name):
    with pytest.raises(ConfigError) as info:
        check_job_env({"RAY_AUTH_MODE": "token", name: "s3cr3t-value"})
    message = str(info.value)
    assert "\n" not in message
    assert f"env var {name} is a credential" in message
    assert "cluster's nodes" in message and "deploy/README.md" in message
    assert "s3cr3t-value" not in message  # the error never echoes the secret


def test_a_url_with_a_password_in_the_job_env_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as info:
        check_job_env({"MLFLOW_TRACKING_URI": "http://alice:s3cr3t@10.0.0.10:5000"})
    message = str(info.value)
    assert "MLFLOW_TRACKING_URI" in message and "s3cr3t" not in message and "\n" not in message
    assert f"http://alice:{REDACTED}@10.0.0.10:5000" in message


def test_job_argv_with_a_password_url_is_refused():
    check_job_argv(["--set", "tracking.uri=http://10.0.0.10:5000", "--set", "data.path=/mnt/shared/d"])
    with pytest.raises(ConfigError) as info:
        check_job_argv(["--set", "tracking.uri=https://bob:hunter2hunter2@mlflow.internal/"])
    assert "hunter2" not in str(info.value) and "tracking.uri=https://bob:" in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("http://u:pw@h:5000/p?q=1", f"http://u:{REDACTED}@h:5000/p?q=1"),
    ("x=postgresql://mlflow:pw@db:5432/mlflow y", f"x=postgresql://mlflow:{REDACTED}@db:5432/mlflow y"),
    ("http://h:5000", "http://h:5000"),
    ("ssh://git@github.com/x", "ssh://git@github.com/x"),  # a user without a password is no secret
    ("sqlite:////home/ray/mlflow/mlflow.db", "sqlite:////home/ray/mlflow/mlflow.db"),
    ("no url here", "no url here"),
])
def test_redact_urls(text, expected):
    assert redact_urls(text) == expected
    assert has_url_password(text) == (text != expected)


def test_scrub_params_redacts_secrets_and_keeps_everything_else():
    params = {"tracking.uri": "http://u:pw@h:5000", "tracking.password": "pw", "train.lr": 0.01,
              "data.path": "/mnt/shared/d", "x.token": None, "objective.name": "dftopk"}
    clean = scrub_params(params)
    assert clean == {"tracking.uri": f"http://u:{REDACTED}@h:5000", "tracking.password": REDACTED,
                     "train.lr": 0.01, "data.path": "/mnt/shared/d", "x.token": None, "objective.name": "dftopk"}
    assert params["tracking.password"] == "pw"  # the input is left alone
