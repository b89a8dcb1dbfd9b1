"""``cascadelab bench``'s own code: overrides on a suite's config and the metric names it logs."""

import pytest

from cascadelab.jobs.bench import SUITES, apply_overrides, scalar_metrics
from cascadelab.platform.bench.operators import OperatorBenchConfig
from cascadelab.platform.config import ConfigError


def test_overrides_set_typed_fields_of_the_suite_config():
    cfg = apply_overrides(OperatorBenchConfig(), ["steps=3", "sizes=[5, 10]", "device=cpu", "threads="])
    assert (cfg.steps, cfg.sizes, cfg.threads) == (3, (5, 10), None)  # a YAML list becomes the field's tuple
    assert apply_overrides(OperatorBenchConfig(), {"warmup": 2}).warmup == 2
    assert apply_overrides(OperatorBenchConfig(), ["steps=3", "steps=4"]).steps == 4  # the later one wins


@pytest.mark.parametrize("item, match", [
    ("stepz=3", "unknown benchmark option 'stepz'; valid: .*steps"),
    ("steps", "override 'steps': expected key=value"),
])
def test_bad_overrides_name_the_option(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(OperatorBenchConfig(), [item])


def test_scalar_metrics_are_the_numeric_leaves_with_slash_names():
    summary = {"dftopk": {"n=1000": {"fwd_ms": 2, "ok": True}, "note": "x"}, "speedup (x)": 1.5}
    assert scalar_metrics(summary) == {"dftopk/n_1000/fwd_ms": 2.0, "speedup _x_": 1.5}


def test_every_suite_has_a_config_dataclass_and_a_runner():
    assert set(SUITES) == {"operators", "objectives", "train", "ingest", "convert"}
    for config_cls, run in SUITES.values():
        assert callable(run) and config_cls().__dataclass_fields__
