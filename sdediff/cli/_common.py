"""What the hydra entry points share: the config directory, start-up validation, one-line errors.

This package (``sdediff.cli``) is the only place that imports hydra / omegaconf.

Every bad input stops a command with one line on stderr and exit status 2, before any work starts::

    sdediff-<cmd>: error: <key>=<value>: <what is allowed>

* :func:`preflight` runs before hydra's own machinery: it parses the command line, checks that every
  config-group choice exists (listing the valid ones) and composes the config once, so that hydra's
  multi-line composition errors never reach the user.
* :func:`clean_errors` turns the library's errors (:class:`~sdediff.errors.ConfigError`,
  :class:`~sdediff.errors.ArgumentError`, :class:`~sdediff.checkpoint.CheckpointError`, data and
  hydra instantiation errors) into that line, naming the config key where it can be known, and removes
  the run directory hydra made for this run when nothing but hydra's own files is in it.
* :func:`build` instantiates the run's objects and checks them against each other (the model on a
  batch of the data, the sampler on the SDE) before anything is trained or sampled.
* :func:`build_from_checkpoint` rebuilds objects from a checkpoint's stored config only through the
  allow-list of :func:`sdediff.checkpoint.check_targets`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import inspect
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ..checkpoint import CheckpointError, check_targets
from ..errors import ArgumentError, ConfigError, TrainingError

__all__ = [
    "config_dir",
    "fail",
    "clean_errors",
    "preflight",
    "build",
    "build_from_checkpoint",
    "check_sampler",
    "check_model_fits",
    "needs_sigma_data",
    "fill_sigma_data",
    "check_seed",
    "check_out_dir",
    "instantiate_at",
    "describe",
    "keyed",
    "to_plain",
    "train_kwargs",
    "output_dir",
    "run_logger",
]


def config_dir() -> str:
    """Absolute path of the configs shipped inside the installed package (``sdediff.configs``).

    ``configs/`` sits at the top of the repository and is installed as the package ``sdediff.configs``
    (see pyproject.toml), so an editable checkout and a non-editable wheel resolve it the same way.
    """
    return str(Path(str(importlib.resources.files("sdediff.configs"))).resolve())


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` on stderr (one line) and exit with status 2 (no traceback)."""
    line = " ".join(str(message).split())
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------------
# one line per problem
# ------------------------------------------------------------------------------------------------
_CONVENTION = re.compile(
    r"^(?:(?P<owner>[\w.]+): )?(?P<name>\w+) (?P<allowed>must .*?), got (?P<value>.+)$", re.S
)


def _show(value: Any) -> str:
    """A config value as it is typed on the command line."""
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, dict) and "_target_" in value:  # a config node: name what it builds
        return str(value["_target_"])
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _cfg_value(cfg: DictConfig | None, key: str) -> tuple[bool, Any]:
    if cfg is None:
        return False, None
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - a key that is not a valid path
        return False, None
    if node is None and not _has_key(cfg, key):
        return False, None
    return True, node


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:  # noqa: BLE001
        return False
    return isinstance(node, DictConfig) and leaf in node


def keyed(key: str, value: Any, allowed: str) -> str:
    """The standard line ``key=value: allowed``."""
    return f"{key}={_show(value)}: {allowed}"


def _from_argument(e: ArgumentError, prefix: str | None, cfg: DictConfig | None) -> str:
    key = e.key if prefix is None else f"{prefix}.{e.key}"
    found, value = _cfg_value(cfg, key)
    return keyed(key, value if found else e.value, e.allowed)


def _from_message(msg: str, prefix: str | None, cfg: DictConfig | None) -> str:
    """``owner: name must ..., got value`` (the library's convention) as ``prefix.name=value: must ...``;
    otherwise, when exactly one scalar of the config node ``prefix`` appears in the message (a path),
    ``prefix.param=value: message``; else ``prefix: message``."""
    m = re.search(r"(\w+)(?:\.__init__)?\(\) got an unexpected keyword argument '(\w+)'", msg)
    if m and prefix is not None:
        key = f"{prefix}.{m[2]}"
        found, value = _cfg_value(cfg, key)
        if found:
            return keyed(key, value, f"is not an argument of {m[1]}; remove it with ~{key}")
    m = re.search(
        r"(\w+)(?:\.__init__)?\(\) missing \d+ required (?:positional |keyword-only )?"
        r"arguments?: '(\w+)'",
        msg,
    )
    if m and prefix is not None:
        return f"{prefix}.{m[2]}=???: is required by {m[1]}; pass +{prefix}.{m[2]}=..."
    m = _CONVENTION.match(msg.strip())
    if m and prefix is not None:
        key = f"{prefix}.{m['name']}"
        found, value = _cfg_value(cfg, key)
        if found:
            return keyed(key, value, m["allowed"])
    if m and prefix is None and "." in m["name"]:
        return keyed(m["name"], m["value"], m["allowed"])
    if prefix is not None and cfg is not None:
        found, node = _cfg_value(cfg, prefix)
        if found and isinstance(node, DictConfig):
            hits = [
                k
                for k, v in node.items_ex(resolve=False)
                if isinstance(v, str) and len(v) > 2 and not k.startswith("_") and v in msg
            ]
            paths = [k for k in hits if k in ("path", "root", "file") or "/" in str(node[k])]
            if len(hits) == 1 or len(paths) == 1:
                k = hits[0] if len(hits) == 1 else paths[0]
                value = str(node[k])
                rest = msg[len(value) :].lstrip(": ").strip() if msg.startswith(value) else msg
                return keyed(f"{prefix}.{k}", node[k], rest)
    return f"{prefix}: {msg}" if prefix else msg


def describe(e: BaseException, cfg: DictConfig | None = None, prefix: str | None = None) -> str:
    """One line for a problem, naming the config key where it can be known.

    ``prefix`` is the config node the error came from when the caller knows it (e.g. ``"sampler"``);
    hydra's instantiation errors carry their own (``full_key``).
    """
    if isinstance(e, InstantiationException):
        key = prefix
        for line in str(e).splitlines():
            if line.startswith("full_key:"):
                key = line.split(":", 1)[1].strip() or prefix
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is None:
            return f"{key}: {str(e).splitlines()[0]}" if key else str(e).splitlines()[0]
        return describe(cause, cfg, key)
    if isinstance(e, _Located):
        return describe(e.error, cfg, e.key)
    if isinstance(e, ArgumentError):
        return _from_argument(e, prefix, cfg)
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a value"
        return f"{key}=???: is not set; pass it on the command line, e.g. {key}=..."
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0]
        return f"{key}: {first}" if key else first
    if isinstance(e, FileNotFoundError | ValueError | TypeError | KeyError):
        msg = str(e) if not isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        return _from_message(msg, prefix, cfg)
    return str(e)


_STARTED = time.time()


def _drop_fresh_run_dir() -> None:
    """Remove the run directory hydra made for this run if it holds nothing but hydra's own files
    (``.hydra/`` and the job's log), all written by this process; then its ``outputs/<date>`` parents
    under the working directory if they are left empty. The working directory itself, or a folder
    holding anything older than this process, is never removed."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not under hydra's runtime (tests, library use)
        return
    if OmegaConf.is_missing(hc.runtime, "output_dir"):  # a config composed by hydra's compose API, no run
        return
    run = Path(hc.runtime.output_dir).resolve()
    cwd = Path.cwd().resolve()
    if not run.is_dir() or run == cwd or run in cwd.parents:
        return
    own = {".hydra", f"{hc.job.name}.log"}
    if any(p.name not in own for p in run.iterdir()):
        return
    if any(p.stat().st_mtime < _STARTED - 1.0 for p in run.rglob("*")):
        return  # something there predates this run
    shutil.rmtree(run, ignore_errors=True)
    outputs = cwd / "outputs"
    for parent in run.parents:
        if parent == outputs.parent or outputs not in (parent, *parent.parents):
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


@contextlib.contextmanager
def clean_errors(prog: str, cfg: DictConfig | None = None) -> Iterator[None]:
    """Turn configuration, data and checkpoint errors into one line on stderr and exit status 2,
    leaving no output folder behind for a run that failed before writing anything."""
    try:
        yield
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, HydraException) as e:
        _drop_fresh_run_dir()
        fail(prog, describe(e, cfg))
    except (MissingMandatoryValue, OmegaConfBaseException) as e:
        _drop_fresh_run_dir()
        fail(prog, describe(e, cfg))


# ------------------------------------------------------------------------------------------------
# before hydra: the command line and the composed config
# ------------------------------------------------------------------------------------------------
def _groups() -> dict[str, list[str]]:
    root = Path(config_dir())
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(("_", "."))
    }


def _compose_error(e: BaseException, text: str, config_name: str | None = None) -> str:
    if isinstance(e, MissingConfigException) or "Could not find" in str(e):
        m = re.search(r"Could not find '([^']+)/([^']+)'", str(e))
        if m:
            group, option = m.groups()
            opts = _groups().get(group, [])
            return keyed(group, option, f"no such {group} config; choose one of {', '.join(opts)}")
        m = re.search(r"Could not find '([^']+)'", str(e))
        return f"{text}: no such config {m.group(1) if m else ''}".strip()
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.match(r"Could not override '([^']+)'", first)
    if m:
        cause = e.__cause__
        why = str(cause).splitlines()[0] if cause is not None else "no such key"
        if "not in struct" in why or "ConfigKeyError" in type(cause).__name__ or "Key '" in why:
            from ._outputs import closest_key_hint

            fix = closest_key_hint(config_name, text) if config_name else f"add a new one with +{text}"
            return f"{text}: no such key in the config; {fix}"
        return f"{text}: {why}"
    if "Error parsing override" in first or "no viable alternative" in first or "mismatched" in first:
        detail = " ".join(str(e).splitlines()[1:2]) or first
        return f"{text}: cannot parse this override ({detail.strip()}); write key=value"
    return f"{text}: {first}"


def overridden(key: str) -> bool:
    """Whether ``key=...`` (or a key below it, ``key.x=...``) was given on the command line (False when
    the config was composed without hydra's runtime, as in tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except ValueError:
        return False
    for o in task:
        name = o.lstrip("+~").split("=", 1)[0]
        if name == key or name.startswith(key + "."):
            return True
    return False


def preflight(prog: str, config_name: str, argv: list[str] | None = None) -> None:
    """Check the command line before hydra runs: group choices exist, overrides parse and the config
    composes. Any problem exits 2 with one line; nothing is written."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if argv is None:  # the real command line: hydra's run directory follows out_dir= (issue 28)
        from ._outputs import one_line_warnings, route_run_dir

        sys.argv[1:] = route_run_dir(sys.argv[1:])
        one_line_warnings(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # argparse's own usage message; hydra will print it again
    flags = ("help", "hydra_help", "cfg", "info", "shell_completion", "version")
    if any(getattr(args, f, None) for f in flags):
        return
    if args.config_path or args.config_dir or args.experimental_rerun:
        return  # another config source: hydra's business
    name = args.config_name or config_name
    groups = _groups()
    parser = OverridesParser.create()
    for text in args.overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except HydraException as e:
            fail(prog, _compose_error(e, text))
        if ov.key_or_group not in groups or ov.is_delete():
            continue
        try:
            choices = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_string()]
        except HydraException:
            continue  # glob() / range() sweeps: resolved by hydra itself
        for choice in choices:
            if choice not in groups[ov.key_or_group] and choice != "null":
                group = ov.key_or_group
                options = ", ".join(groups[group])
                fail(prog, keyed(group, choice, f"no such {group} config; choose one of {options}"))
    if args.multirun:
        return  # sweeps compose per job
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            for i in range(len(args.overrides) + 1):  # find the first override that breaks composition
                try:
                    compose(name, overrides=args.overrides[:i], return_hydra_config=True)
                except (HydraException, OmegaConfBaseException, ValueError) as e:
                    text = args.overrides[i - 1] if i else name
                    fail(prog, _compose_error(e, text, name))
                if i == len(args.overrides):
                    break
                if i == 0:  # fast path: compose everything at once, stepping only on failure
                    try:
                        compose(name, overrides=args.overrides, return_hydra_config=True)
                        break
                    except (HydraException, OmegaConfBaseException, ValueError):
                        continue
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------------------------
# building and checking the run's objects
# ------------------------------------------------------------------------------------------------
def to_plain(cfg: DictConfig | None) -> Any:
    """A resolved config as plain Python containers (for JSON), ``None`` as is."""
    if cfg is None:
        return None
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def check_seed(value: Any, key: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError(key, value, "must be a non-negative integer")
    return value


def check_out_dir(cfg: DictConfig) -> None:
    out = cfg.get("out_dir")
    if out and Path(str(out)).exists() and not Path(str(out)).is_dir():
        raise ArgumentError("out_dir", str(out), "must be a directory (it is a file); choose another path")


def train_kwargs(cfg_train: DictConfig) -> dict[str, Any]:
    """``cfg.train`` as keyword arguments of :func:`sdediff.training.train`, refusing unknown keys."""
    from ..training import train

    kwargs = to_plain(cfg_train)
    kwargs.pop("fit_grids", None)  # sdediff-train's own step after training (cli/train.py), not train()'s
    allowed = {n for n, p in inspect.signature(train).parameters.items() if p.kind is p.KEYWORD_ONLY} - {
        "out_dir",
        "config",
        "callback",
    }
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ArgumentError(
            f"train.{unknown[0]}",
            kwargs[unknown[0]],
            f"is not a train option; known: {', '.join(sorted(allowed))}",
        )
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def instantiate_at(node: DictConfig, key: str, **kwargs):
    """``instantiate`` with errors that name ``key`` (hydra's own ``full_key`` is relative to the node)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        m = re.match(r"Error (?:loading|locating target) '([^']+)'", str(e))
        if m:  # a _target_ that cannot be imported: name its key
            where = _target_key(node, m.group(1), key) or f"{key}._target_"
            cause = e.__cause__ or e
            why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise ArgumentError(where, m.group(1), f"cannot be imported ({why})") from None
        inner = None
        for line in str(e).splitlines():
            if line.startswith("full_key:"):
                inner = line.split(":", 1)[1].strip()
        # hydra's full_key is absolute for a node of a composed config, relative for a detached one
        full = inner if inner and (inner == key or inner.startswith(key + ".")) else key
        if inner and full == key and inner != key:
            full = f"{key}.{inner}"
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ArgumentError):
            raise ArgumentError(f"{full}.{cause.key}", cause.value, cause.allowed) from None
        raise _Located(full, cause if cause is not None else e) from None
    except (ValueError, TypeError) as e:
        raise _Located(key, e) from None


def _target_key(node, target: str, key: str) -> str | None:
    """The dotted key of the ``_target_`` equal to ``target`` in the config tree ``node``."""
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            sub = f"{key}.{k}"
            if k == "_target_" and v == target:
                return sub
            found = _target_key(v, target, sub)
            if found:
                return found
    elif OmegaConf.is_list(node):
        for i, v in enumerate(node):
            found = _target_key(v, target, f"{key}[{i}]")
            if found:
                return found
    return None


class _Located(ConfigError):
    """An error of the config node ``key`` (described by :func:`describe` with that prefix)."""

    def __init__(self, key: str, error: BaseException):
        self.key, self.error = key, error
        super().__init__(f"{key}: {error}")


def build(cfg: DictConfig, *, data: bool = True) -> dict[str, Any]:
    """Instantiate the run's objects from a composed config: ``sde``, ``model``, ``loss``, ``sampler``
    and (with ``data=True``) ``data``. The model is initialised after ``torch.manual_seed(cfg.seed)``.
    With the data, the model is tried on two of its items and the sampler on the SDE and the items'
    shape, so a mismatch stops the run here, before any work."""
    import torch

    seed = check_seed(cfg.get("seed", 0))
    out: dict[str, Any] = {}
    out["sde"] = instantiate_at(cfg.sde, "sde")
    if data and needs_sigma_data(cfg):  # before the seed: the model's initialisation stays the same
        out["data"] = instantiate_at(cfg.data, "data")
        fill_sigma_data(cfg, out["data"])
    torch.manual_seed(seed)
    out["model"] = instantiate_at(cfg.model, "model")
    has_loss = "loss" in cfg and cfg.loss is not None
    out["loss"] = instantiate_at(cfg.loss, "loss", sde=out["sde"]) if has_loss else None
    from ..losses import HybridLoss

    if isinstance(out["loss"], HybridLoss) and not getattr(out["model"], "learn_variance", False):
        raise ArgumentError(
            "model.learn_variance",
            False,
            "must be true with loss=hybrid (it trains the model's variance output); "
            "set model.learn_variance=true",
        )
    out["sampler"] = instantiate_at(cfg.sampler, "sampler") if cfg.get("sampler") is not None else None
    if data:
        if "data" not in out:
            out["data"] = instantiate_at(cfg.data, "data")
        from ..data import as_tensor

        x = as_tensor(out["data"])
        key = next((f"data.{k}" for k in ("path", "root", "name") if k in cfg.data), "data._target_")
        value = OmegaConf.select(cfg, key)
        if x.ndim < 2 or len(x) < 1:
            raise ArgumentError(
                key, value, f"must give a data set of items, got a tensor of shape {tuple(x.shape)}"
            )
        if x.is_floating_point():
            bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0])
                raise ArgumentError(
                    key,
                    value,
                    f"must hold finite values: {int(bad.sum())} of {len(x)} items hold NaN or inf "
                    f"(first at index {first}); clean the data",
                )
        check_model_fits(out["model"], x[:2], cfg)
        if out["sampler"] is not None:
            lv = bool(getattr(out["model"], "learn_variance", False))
            check_sampler(out["sampler"], out["sde"], tuple(x.shape[1:]), lv)
    return out


def needs_sigma_data(cfg: DictConfig) -> bool:
    """Whether ``cfg.model`` is a preconditioned (``prediction: edm``) model whose ``sigma_data`` is
    null: then it is estimated from the training data at start-up (:func:`fill_sigma_data`)."""
    model = cfg.get("model")
    return (
        isinstance(model, DictConfig)
        and model.get("prediction") == "edm"
        and model.get("sigma_data", None) is None
    )


def fill_sigma_data(cfg: DictConfig, data) -> float:
    """Write the training data's standard deviation (:func:`sdediff.models.data_sigma`: the per-dimension
    variance averaged over dimensions, of the dequantized data when ``train.dequantize``) into
    ``cfg.model.sigma_data``, so that the run's stored config (and every checkpoint) holds the number a
    resumed run is checked against; returns it."""
    from ..data import as_tensor
    from ..models import data_sigma

    x = as_tensor(data)
    deq = bool(OmegaConf.select(cfg, "train.dequantize", default=False))
    try:
        value = data_sigma(x, dequantize=deq)
    except ArgumentError as e:
        raise ArgumentError(
            "model.sigma_data", None, f"cannot be estimated: the training data {e.allowed}; set a number"
        ) from None
    with open_dict(cfg):
        cfg.model.sigma_data = value
    return value


def check_model_fits(model, x, cfg: DictConfig | None = None) -> None:
    """Raise an :class:`ArgumentError` naming the model config unless ``model(x, t)`` runs on these
    data items and returns their shape."""
    import torch

    net = getattr(model, "net", model)
    dim = getattr(net, "dim", None)
    features = int(x[0].numel())
    if isinstance(dim, int) and dim != features:
        raise ArgumentError(
            "model.net.dim",
            dim,
            f"must equal the data's features per item ({features}, items of shape "
            f"{tuple(x.shape[1:])}); set model.net.dim={features}",
        )
    in_ch = getattr(net, "in_ch", None)
    if isinstance(in_ch, int) and (x.ndim != 4 or x.shape[1] != in_ch):
        want = x.shape[1] if x.ndim == 4 else None
        fix = f"; set model.net.in_ch={want}" if want else " (the U-Net needs (C, H, W) images)"
        raise ArgumentError(
            "model.net.in_ch", in_ch, f"must fit the data's items of shape {tuple(x.shape[1:])}{fix}"
        )
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            y = model(x.float(), torch.full((len(x),), 0.5))
            model.train(was)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        target = cfg.model.net.get("_target_") if cfg is not None and "net" in cfg.model else None
        raise ArgumentError(
            "model.net._target_" if target else "model",
            target or type(model).__name__,
            f"must accept the data's items of shape {tuple(x.shape[1:])} ({type(e).__name__}: {first})",
        ) from None
    if tuple(y.shape) != tuple(x.shape):
        raise ArgumentError(
            "model",
            type(net).__name__,
            f"must return the items' shape {tuple(x.shape[1:])}, got {tuple(y.shape[1:])}",
        )


_SAMPLER_KEYS = ("name", "steps", "grid", "t_min")


def check_sampler(sampler, sde, item_shape: tuple[int, ...], learn_variance: bool = False) -> None:
    """Run the sampler's validation on this SDE (grid, t_min, steps, options) with a null network on
    one item (:meth:`sdediff.samplers.Sampler.check`): every check ``sample()`` and the sampler make,
    before any real work. Errors name the ``sampler.*`` config key."""
    try:
        sampler.check(sde, (1, *item_shape), learn_variance=learn_variance)
    except ArgumentError as e:
        key = e.key if e.key in _SAMPLER_KEYS or e.key.startswith("options.") else f"options.{e.key}"
        raise ArgumentError(f"sampler.{key}", e.value, e.allowed) from None
    except (ValueError, TypeError) as e:
        raise _Located("sampler", e) from None


def build_from_checkpoint(
    run_cfg: Any, keys: tuple[str, ...], source: str, trusted: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Objects rebuilt from a checkpoint's stored config (plain JSON data): each ``run_cfg[key]`` is
    checked by :func:`sdediff.checkpoint.check_targets` (allow-listed ``_target_`` only, nested ones
    too, no interpolations) before hydra instantiates anything."""
    if not isinstance(run_cfg, dict) or any(k not in run_cfg for k in keys):
        missing = [k for k in keys if not isinstance(run_cfg, dict) or k not in run_cfg]
        raise CheckpointError(
            f"checkpoint {source} holds no {'/'.join(missing)} config (it was not written by sdediff-train); "
            "load its weights with sdediff.checkpoint.load_model_weights into a model you build yourself"
        )
    for key in keys:
        check_targets(run_cfg[key], key, source, frozenset(trusted))
    out = {}
    for key in keys:
        try:
            out[key] = instantiate(OmegaConf.create(run_cfg[key]))
        except (InstantiationException, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {source}: cannot rebuild its {key} ({describe(e)})") from None
    return out


def run_logger(rank: int = 0):
    """Print on rank 0 and append the same line to the run's log file (hydra's ``<job>.log``)."""
    import logging

    def log(msg: str, *args, **kwargs) -> None:
        if rank != 0:
            return
        print(msg, *args, **kwargs)
        record = logging.LogRecord("sdediff", logging.INFO, __file__, 0, msg, None, None)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)

    return log


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.out_dir`` if set, else hydra's run directory."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
