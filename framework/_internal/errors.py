"""The framework's error tree. Every error the framework raises is a ``FrameworkError``.

Errors the core raises (``IsolationError``, ...) keep their own root, ``dbcore.CoreError``, and
are re-exported from ``framework`` so user code needs one import.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "AppLoadError",
    "FrameworkError",
    "NoTransactionError",
    "RetriesExhausted",
    "ServiceCallError",
    "UndeclaredEventError",
]


class FrameworkError(Exception):
    """Root of every error raised by ``framework``."""


class AnnotationError(FrameworkError, TypeError):
    """An annotation is used wrongly; raised at import or start-up, naming the function."""

    def __init__(self, function: str, problem: str) -> None:
        self.function = function
        self.problem = problem
        super().__init__(f"{function}: {problem}")


class UndeclaredEventError(FrameworkError, TypeError):
    """``send()`` of an event type the function did not declare with ``@Outbound``."""


class NoTransactionError(FrameworkError, RuntimeError):
    """``session()`` or ``send()`` called outside a ``@Transactional`` function."""


class ServiceCallError(FrameworkError, RuntimeError):
    """A service function was called where it cannot run (another service's transaction, no App)."""


class RetriesExhausted(FrameworkError, RuntimeError):
    """A transaction kept conflicting (serialization failure or deadlock) past its retry budget."""

    def __init__(self, function: str, attempts: int, last: BaseException) -> None:
        self.function = function
        self.attempts = attempts
        self.last = last
        super().__init__(
            f"{function}: gave up after {attempts} attempts, each ended in a serialization "
            f"failure or deadlock (last: {last}); raise the retry budget or reduce contention"
        )


class AppLoadError(FrameworkError, ValueError):
    """``module:attribute`` does not name an App or a list of services (CLI, alembic ``-x app``)."""
