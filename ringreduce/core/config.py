"""Every RINGREDUCE_* environment variable, parsed in one place.

Two kinds of setting:

- read per call (``check_enabled()``, ``algorithm_override()``), because tests
  and users flip them at run time; they read the raw mapping behind os.environ
  (``os.environ.get`` costs ~0.3 us per call in key encoding alone);
- read once by ``rr.init()`` into a :class:`Settings` (seconds, paths, levels),
  which the runtime hands to the layers that need them.

Example::

    from ringreduce.core import config
    config.check_enabled()          # False when RINGREDUCE_CHECK=0/false/off/no
    config.Settings.from_env().timeout
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = ["Settings", "check_enabled", "algorithm_override", "collective_algorithm_override", "flag",
           "seconds", "OFF", "ON"]

logger = logging.getLogger("ringreduce")

OFF = ("0", "false", "off", "no")
ON = ("1", "true", "on", "yes")

_RAW_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _raw(name: str) -> str | None:
    """The variable's value now, or None (read per call: set at run time, it still counts)."""
    if _RAW_ENV is None:
        return os.environ.get(name)
    value = _RAW_ENV.get(name.encode())
    return None if value is None else value.decode()


def check_enabled() -> bool:
    """RINGREDUCE_CHECK: the mismatch check, on unless set to 0/false/off/no."""
    # Read on every call, so this one is kept to a dict lookup when the variable is unset.
    if _RAW_ENV is not None and b"RINGREDUCE_CHECK" not in _RAW_ENV:
        return True
    raw = _raw("RINGREDUCE_CHECK")
    return raw is None or raw.strip().lower() not in OFF


def algorithm_override() -> str | None:
    """RINGREDUCE_ALGORITHM, or None when unset or empty."""
    if _RAW_ENV is not None and b"RINGREDUCE_ALGORITHM" not in _RAW_ENV:
        return None
    raw = _raw("RINGREDUCE_ALGORITHM")
    return (raw.strip() or None) if raw is not None else None


def collective_algorithm_override(kind: str) -> str | None:
    """RINGREDUCE_ALLGATHER_ALGORITHM / RINGREDUCE_REDUCESCATTER_ALGORITHM (kind: "allgather",
    "reducescatter"), or None when unset or empty: forces the algorithm of that collective."""
    raw = _raw(f"RINGREDUCE_{kind.upper()}_ALGORITHM")
    return (raw.strip() or None) if raw is not None else None


def flag(name: str, default: bool = False) -> bool:
    """A boolean variable: 1/true/on/yes or 0/false/off/no (anything else: the default)."""
    raw = (_raw(name) or "").strip().lower()
    if raw in ON:
        return True
    if raw in OFF:
        return False
    return default


def seconds(name: str, default: float) -> float:
    """A duration in seconds; 0 or negative turns the limit off (infinity)."""
    raw = (_raw(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", name, raw, default)
        return default
    return value if value > 0 else float("inf")


def integer(name: str, default: int) -> int:
    raw = (_raw(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        logger.warning("%s=%r is not an integer; using %s", name, raw, default)
        return default


def text(name: str) -> str | None:
    """A string variable, stripped; None when unset or empty."""
    raw = (_raw(name) or "").strip()
    return raw or None


@dataclass(frozen=True)
class Settings:
    """The settings rr.init() reads once.

    The others are read where they take effect, through the functions above:
    RINGREDUCE_CHECK, RINGREDUCE_ALGORITHM and RINGREDUCE_{ALLGATHER,REDUCESCATTER}_ALGORITHM
    per call, RINGREDUCE_NODE_ID and RINGREDUCE_TUNING per new communicator context, RINGREDUCE_STATS_ERROR per
    compressed call, RINGREDUCE_STAGING_BYTES per stager, RINGREDUCE_CUDA_AWARE
    when the device mode is first detected (core.device).
    """

    stall_warning: float = 60.0        # RINGREDUCE_STALL_WARNING, seconds
    timeout: float = 600.0             # RINGREDUCE_TIMEOUT, seconds
    deadlock_after: float = 2.0        # RINGREDUCE_DEADLOCK_SECONDS: ask peers after this long
    timeline: str | None = None        # RINGREDUCE_TIMELINE, a path (may hold "{rank}")
    log_level: str = "WARNING"         # RINGREDUCE_LOG_LEVEL

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            stall_warning=seconds("RINGREDUCE_STALL_WARNING", 60.0),
            timeout=seconds("RINGREDUCE_TIMEOUT", 600.0),
            deadlock_after=seconds("RINGREDUCE_DEADLOCK_SECONDS", 2.0),
            timeline=text("RINGREDUCE_TIMELINE"),
            log_level=(text("RINGREDUCE_LOG_LEVEL") or "WARNING").upper(),
        )
