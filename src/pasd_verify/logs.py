"""Library warnings kept out of the user's terminal, but never lost."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def library_warnings(stage: str, logger: logging.Logger) -> Iterator[list[warnings.WarningMessage]]:
    """Keep the libraries' warnings (torch.jit's tracer notes, AIMET's deprecations) out of the user's terminal:
    they go to ``logger`` at INFO, shown by ``pasd-verify --verbose``, and the caller counts them in its report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        logger.info("%s: %s from %s:%d: %s", stage, w.category.__name__, w.filename, w.lineno, w.message)


@contextmanager
def quiet_loggers(names: Iterable[str]) -> Iterator[None]:
    """Raise the named loggers (AIMET's log areas, which print to the console) to ERROR for the duration, unless
    pasd-verify's own logging is at INFO (``--verbose``), where they are left to show everything."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    if not logging.getLogger("pasd_verify").isEnabledFor(logging.INFO):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
