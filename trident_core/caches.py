"""What the package keeps between runs (text embeddings, model file digests, kernel timings) is only a cache: any
failure to read, parse, validate or write it is a miss, logged once per kind, and the run goes on."""

from __future__ import annotations

import logging

logger = logging.getLogger("trident_core.cache")
_warned: set[str] = set()


def miss(kind: str, what: str, error: BaseException | str) -> None:
    """Log once per `kind` (e.g. "text embeddings") that its cache could not be used, and why."""
    if kind in _warned:
        return
    _warned.add(kind)
    reason = error if isinstance(error, str) else (str(error).splitlines()[0] if str(error) else type(error).__name__)
    logger.warning("the %s cache (%s) cannot be used, the run goes on without it: %s", kind, what, reason)


def forget() -> None:
    """Log again from now on (tests)."""
    _warned.clear()
