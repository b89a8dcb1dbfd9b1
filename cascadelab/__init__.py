"""cascadelab: multi-stage cascade ranking trained end to end through differentiable top-K operators."""

__version__ = "0.1.0"
