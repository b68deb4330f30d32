"""Console output: `logging` under the ``longred`` logger (lines that never break a progress bar), and
one rule for whether progress bars show (``--quiet`` and ``TQDM_DISABLE`` turn them off)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOG", "setup_logging", "progress_enabled"]

LOG = logging.getLogger("longred")


class _BarSafeHandler(logging.Handler):
    """Writes through ``tqdm.write``, so a log line lands above an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(*, verbosity: int = 0) -> None:
    """Log ``longred`` to stderr: -1 warnings only (``--quiet``), 0 info, 1 debug (``--verbose``)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if not any(isinstance(h, _BarSafeHandler) for h in LOG.handlers):
        handler = _BarSafeHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False


def progress_enabled(*, quiet: bool = False) -> bool:
    """Whether progress bars show: not with ``quiet``, nor when ``TQDM_DISABLE`` is set to a true value."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return not (quiet or disabled)
