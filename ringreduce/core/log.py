"""The package logger: one 'ringreduce' logger whose records carry the rank."""
from __future__ import annotations

import logging

from . import config

logger = logging.getLogger("ringreduce")
_configured = False


def configure(rank: int) -> None:
    """Attach a rank-prefixed handler once; RINGREDUCE_LOG_LEVEL sets the level (default WARNING)."""
    global _configured
    if _configured:
        return
    _configured = True
    level = (config.text("RINGREDUCE_LOG_LEVEL") or "WARNING").upper()
    logger.setLevel(getattr(logging, level, logging.WARNING))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[ringreduce rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
