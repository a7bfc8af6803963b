"""The library's error types (a floor module: it imports nothing of sdediff).

* :class:`ConfigError` — a bad argument, data set or configuration, reported before any work starts.
* :class:`ArgumentError` — a :class:`ConfigError` about one named argument. Its fields (``key``,
  ``value``, ``allowed``) let the command-line tools print it as ``<config key>=<value>: <allowed>``;
  its text reads ``owner: key must ..., got value`` in Python.
* :class:`TrainingError` — training went wrong (a non-finite loss or parameters).

:class:`sdediff.checkpoint.CheckpointError` (a ``ValueError`` too) covers missing, corrupt and foreign
checkpoints.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "ArgumentError", "TrainingError"]


class ConfigError(ValueError):
    """A bad argument, data set or configuration, reported before any work starts."""


class ArgumentError(ConfigError):
    """One bad argument value.

    Args:
        key: the argument's name as its owner knows it (``"order"``, ``"beta_min"``) or a full config
            key (``"train.lr"``).
        value: the offending value.
        allowed: what is allowed, phrased to follow the key: ``"must be 1, 2 or 3"``.
        owner: the function or class that refused it (``"dpm_solver"``), or ``None`` when ``key`` is
            already a full config key.
    """

    def __init__(self, key: str, value: Any, allowed: str, owner: str | None = None):
        self.key, self.value, self.allowed, self.owner = key, value, allowed, owner
        head = f"{owner}: " if owner else ""
        super().__init__(f"{head}{key} {allowed}, got {value!r}")


class TrainingError(RuntimeError):
    """Training went wrong (e.g. the loss or the parameters became NaN)."""
