"""Reporting an outage once when it starts and once when it ends, never once per message."""

from __future__ import annotations

import logging
import time

__all__ = ["Outage"]


class Outage:
    """Tracks one dependency (the broker, the database) of one loop.

    ``failed()`` logs a warning only on the first failure of an outage; ``ok()`` logs once that
    the outage ended and how long it lasted. Retries in between stay quiet (debug level).
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, problem: BaseException | str) -> None:
        self.failures += 1
        text = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s: %s; retrying until it recovers", self.what, text)
        else:
            self.log.debug("%s: still failing (%d): %s", self.what, self.failures, text)

    def ok(self) -> None:
        if self.since is not None:
            self.log.warning(
                "%s: recovered after %.1f s (%d failed attempts)",
                self.what,
                time.monotonic() - self.since,
                self.failures,
            )
            self.since = None
            self.failures = 0
