"""Ray Tune sweeps over cascade configs and the MLflow read-back that turns them into paper-style tables."""

from cascadelab.platform.tune.sweep import (
    SweepResult,
    SweepSpec,
    derive_max_concurrent,
    expand_grid,
    load_sweep,
    parse_sweep,
    run_sweep,
)

__all__ = ["SweepResult", "SweepSpec", "derive_max_concurrent", "expand_grid", "load_sweep", "parse_sweep",
           "run_sweep"]
