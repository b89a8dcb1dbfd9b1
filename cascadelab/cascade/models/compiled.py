"""``torch.compile`` of the stage models, with a fallback to eager execution when compilation fails.

Each stage model's ``forward`` is replaced on the instance by a guarded compiled one, so parameter names
and ``state_dict`` keys stay those of the eager modules and checkpoints move freely between the two. The
first failure (no C++ compiler, an unsupported op, a backend error) logs one warning line and switches
every stage of the cascade back to its eager forward for the rest of the process; the call that failed
is rerun eagerly, so training goes on with the same function. Compilation is lazy: it happens at the
first call and again for new input shapes, and a failure at any of those calls is handled the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Fallback:
    """Shared by the stages of one cascade: after one failure all of them run eagerly."""

    def __init__(self) -> None:
        self.failed = False

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            # dynamo wraps the backend's error (BackendCompilerFailed.inner_exception); name the original
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            log.warning("torch.compile failed (%s: %s); training continues in eager mode",
                        type(error).__name__, first_line)
        self.failed = True


class _GuardedForward:
    """``forward(*args)``: the compiled forward until compilation fails once, then the eager one."""

    def __init__(self, eager: Callable[..., Any], backend: str | Callable, fallback: _Fallback):
        self.eager = eager
        self.compiled = torch.compile(eager, backend=backend)
        self.fallback = fallback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fallback.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # any compiler failure; a genuine model error reappears eagerly
                self.fallback.fail(error)
        return self.eager(*args, **kwargs)


def compile_stages(cascade: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """Compile ``cascade.stages[i].forward`` in place (see the module docstring); returns ``cascade``.

    ``backend``: a ``torch.compile`` backend (``"inductor"``, or ``"eager"`` to trace without code
    generation). Calling it twice compiles once.
    """
    fallback = _Fallback()
    for stage in cascade.stages:
        if not isinstance(stage.forward, _GuardedForward):
            stage.forward = _GuardedForward(stage.forward, backend, fallback)
    return cascade
