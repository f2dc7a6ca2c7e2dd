"""Which batch rows of the transformer call now running are the conditional guidance branch, and of which
conditioning: the task layer says so around every model call (sampling.adapter, tasks.flow_edit, StemGen), and
lyric timing (acestep_core.lyric_timing) reads it instead of guessing the branch from the call's tensors.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CURRENT: ContextVar[tuple[object, slice] | None] = ContextVar("acestep_conditional_rows", default=None)


@contextmanager
def conditional_rows(conditioning: object, rows: slice | None) -> Iterator[None]:
    """Inside, the model call's batch rows `rows` are the conditional branch of `conditioning` (None: no row is)."""
    token = _CURRENT.set(None if rows is None or conditioning is None else (conditioning, rows))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_conditional_rows() -> tuple[object, slice] | None:
    """(conditioning, rows) of the model call now running, or None outside a task's call or for a call without
    the conditional branch."""
    return _CURRENT.get()
