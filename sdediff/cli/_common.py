"""What the hydra entry points share: the config directory, building objects, one-line errors.

This package (``sdediff.cli``) is the only place that imports hydra / omegaconf.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ..checkpoint import CheckpointError
from ..train import ConfigError, TrainingError

__all__ = ["config_dir", "fail", "clean_errors", "build", "to_plain", "train_kwargs", "output_dir"]


def config_dir() -> str:
    """Absolute path of the configs shipped inside the installed package (``sdediff.configs``).

    ``configs/`` sits at the top of the repository and is installed as the package ``sdediff.configs``
    (see pyproject.toml), so an editable checkout and a non-editable wheel resolve it the same way.
    """
    return str(Path(str(importlib.resources.files("sdediff.configs"))).resolve())


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with status 2 (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _describe(e: BaseException) -> str:
    """One line for a configuration problem, however hydra wrapped it."""
    if isinstance(e, InstantiationException):
        key = ""
        text = str(e)
        for line in text.splitlines():
            if line.startswith("full_key:"):
                key = line.split(":", 1)[1].strip()
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        msg = f"{type(cause).__name__}: {cause}" if cause is not None else text.splitlines()[0]
        if isinstance(cause, ConfigError | CheckpointError | FileNotFoundError | ValueError):
            msg = str(cause)
        return f"{key}: {msg}" if key else msg
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a value"
        return f"{key} is not set (it is ??? in the config); pass it on the command line, e.g. {key}=..."
    if isinstance(e, OmegaConfBaseException):
        return str(e).splitlines()[0] + (f" (key: {e.full_key})" if getattr(e, "full_key", None) else "")
    return str(e)


@contextlib.contextmanager
def clean_errors(prog: str) -> Iterator[None]:
    """Turn configuration, data and checkpoint errors into one line on stderr and exit status 2."""
    try:
        yield
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, InstantiationException) as e:
        fail(prog, _describe(e))
    except (MissingMandatoryValue, OmegaConfBaseException, HydraException) as e:
        fail(prog, _describe(e))


def to_plain(cfg: DictConfig | None) -> Any:
    """A resolved config as plain Python containers (for JSON), ``None`` as is."""
    if cfg is None:
        return None
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def train_kwargs(cfg_train: DictConfig) -> dict[str, Any]:
    """``cfg.train`` as keyword arguments of :func:`sdediff.train.train`, refusing unknown keys."""
    from ..train import train

    kwargs = to_plain(cfg_train)
    allowed = {n for n, p in inspect.signature(train).parameters.items() if p.kind is p.KEYWORD_ONLY} - {
        "out_dir",
        "config",
        "callback",
    }
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"unknown train option(s) {unknown}; known: {', '.join(sorted(allowed))}")
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def build(cfg: DictConfig, *, data: bool = True) -> dict[str, Any]:
    """Instantiate the run's objects from a composed config: ``sde``, ``model``, ``loss``, ``sampler``
    and (with ``data=True``) ``data``. The model is initialised after ``torch.manual_seed(cfg.seed)``."""
    import torch

    out: dict[str, Any] = {}
    out["sde"] = instantiate(cfg.sde)
    torch.manual_seed(int(cfg.seed))
    out["model"] = instantiate(cfg.model)
    out["loss"] = instantiate(cfg.loss, sde=out["sde"]) if "loss" in cfg and cfg.loss is not None else None
    out["sampler"] = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    if data:
        out["data"] = instantiate(cfg.data)
    return out


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.out_dir`` if set, else hydra's run directory."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
