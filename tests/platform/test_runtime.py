"""The environment the package gives Ray Train (no cluster needed)."""

import os

from cascadelab.platform.runtime import RAY_TRAIN_ENV, apply_ray_train_env, scoped_env

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def test_the_health_check_interval_is_set_where_the_environment_does_not_set_it():
    with scoped_env({INTERVAL: None}):
        apply_ray_train_env()
        assert os.environ[INTERVAL] == RAY_TRAIN_ENV[INTERVAL] == "0.25"


def test_a_value_the_user_set_wins():
    with scoped_env({INTERVAL: "3"}):
        apply_ray_train_env()
        assert os.environ[INTERVAL] == "3"
