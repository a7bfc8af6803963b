"""The glue between the entry points and :mod:`sdediff.outputs`: one ``with command(PROG, cfg):`` per
command takes the output directory's lock, stages its files as one atomic set, refuses unknown
``+key=`` additions, and turns every I/O fault into one line and exit status 1 (bad input stays 2)."""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ArgumentError
from ..outputs import lock_output, output_set
from ._common import clean_errors

__all__ = ["command", "io_fail", "check_added_keys", "closest", "route_run_dir", "one_line_warnings"]


def io_fail(prog: str, e: OSError) -> None:
    """Print one line for an I/O fault and exit with status 1."""
    from ..outputs import OutputError

    if isinstance(e, OutputError):
        line = str(e)
    else:
        where = e.filename if e.filename is not None else "an output"
        line = f"cannot write {where}: {e.strerror or e}" + (f" [Errno {e.errno}]" if e.errno else "")
    line = " ".join(line.split())
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _out_dir(cfg: DictConfig | None) -> Path | None:
    if cfg is None:
        return None
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if OmegaConf.is_missing(hc.runtime, "output_dir"):
            return None
        return Path(hc.runtime.output_dir)
    except ValueError:  # composed without hydra's runtime (tests, library use): out_dir decides
        return None


@contextlib.contextmanager
def command(prog: str, cfg: DictConfig | None) -> Iterator[Path | None]:
    """The frame of a command's run: one-line errors (exit 2 for bad input, 1 for I/O faults), the
    output directory's lock and its atomic output set. Yields the output directory (or None)."""
    try:
        with clean_errors(prog, cfg):
            check_added_keys(cfg)
            out = _out_dir(cfg) if int(os.environ.get("RANK", "0") or 0) == 0 else None
            with lock_output(out, prog), output_set(out):
                yield out
    except FileNotFoundError:
        raise  # clean_errors has reported it (never reached: it exits)
    except OSError as e:
        io_fail(prog, e)


def closest(name: str, candidates) -> str | None:
    """The candidate closest to ``name`` (difflib), or None."""
    found = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    return found[0] if found else None


def closest_key_hint(config_name: str, text: str) -> str:
    """What to do about the unknown key of the override ``text`` (``key=value``) in the config
    ``config_name`` (composed without overrides, inside hydra's initialized config dir): ``did you mean
    a.b?`` when a key of the same node is close (difflib), plus the ``+`` addition where the node builds an
    object (a new keyword argument); else the ``+`` addition alone."""
    from hydra import compose

    key = text.split("=", 1)[0]
    plus = f"add a new one with +{text}"
    parent, _, leaf = key.rpartition(".")
    try:
        cfg = compose(config_name)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:  # noqa: BLE001 - only a hint
        return plus
    if not isinstance(node, DictConfig):
        return plus
    near = closest(leaf, [str(k) for k in node.keys()])
    if not near:
        return plus
    hint = f"did you mean {parent + '.' if parent else ''}{near}?"
    parts = parent.split(".") if parent else []
    builds = any(
        isinstance(n := OmegaConf.select(cfg, ".".join(parts[:i])), DictConfig) and "_target_" in n
        for i in range(1, len(parts) + 1)
    )
    return f"{hint} (or add a new argument with +{text})" if builds else hint


def check_added_keys(cfg: DictConfig | None) -> None:
    """Refuse ``+a.b=v`` on the command line where ``a`` is a settings node (neither it nor a node above
    it has a ``_target_``: nothing would ever read the new key), naming the closest existing key.
    ``+key`` into a node that builds an object passes a new keyword argument and stays allowed."""
    if cfg is None:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        return
    groups = _groups()
    for text in task:
        if not text.startswith("+") or text.startswith("++"):
            continue
        key, _, value = text[1:].partition("=")
        if key in groups or "/" in key or key.startswith(("hydra", "train.")):
            continue  # a config group (+experiment=...), hydra's settings, train (train_kwargs checks it)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        parts = parent.split(".") if parent else []
        ancestors = [OmegaConf.select(cfg, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        if not isinstance(node, DictConfig) or any(
            isinstance(a, DictConfig) and "_target_" in a for a in ancestors
        ):
            continue  # the arguments of a constructor (it checks them itself)
        known = [str(k) for k in node.keys() if k != leaf]
        near = closest(leaf, known)
        hint = f"did you mean {parent + '.' if parent else ''}{near}? " if near else ""
        where = f"the {parent} settings" if parent else "the config"
        raise ArgumentError(
            key, value, f"is not a key of {where} and nothing would read it; {hint}remove the + addition"
        )


def _groups() -> set[str]:
    from ._common import _groups as groups

    return set(groups())


def route_run_dir(argv: list[str]) -> list[str]:
    """With ``out_dir=X`` on the command line (and no ``hydra.run.dir``), hydra's run directory is ``X``
    and hydra writes nothing there (no ``.hydra/``, no job log file: the lines go to the terminal only):
    nothing appears under ``outputs/<date>/<time>`` in the working directory, and a command refused for
    bad input or by another writer's lock leaves ``X`` exactly as it was."""
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        return argv
    if any(a.lstrip("+").startswith(("hydra.run.dir=", "hydra.output_subdir=")) for a in argv):
        return argv
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out_dir=")]
    if not outs or outs[-1] in ("", "null") or Path(outs[-1].strip("'\"")).is_file():
        return argv  # (a file: the command's own check says so in one line)
    if any(a.startswith("hydra/job_logging=") for a in argv):
        return [*argv, f"hydra.run.dir={outs[-1]}", "hydra.output_subdir=null"]
    return [*argv, f"hydra.run.dir={outs[-1]}", "hydra.output_subdir=null", "hydra/job_logging=none"]


def one_line_warnings(prog: str) -> None:
    """Show the library's warnings (a skipped damaged checkpoint, changed settings on resume, a
    metrics.csv set aside) as one line each, ``<prog>: warning: <message>``, on stderr."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
