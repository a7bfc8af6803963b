"""diffusers DDPM checkpoints as sdediff models: the same weights under every sampler and likelihood.

:func:`from_diffusers` reads a local diffusers pipeline folder (``model_index.json``, ``unet/``,
``scheduler/``; e.g. a ``DDPMPipeline.save_pretrained`` output) or a ``UNet2DModel`` and scheduler
already in memory, and returns ``(model, sde)``:

* the SDE is the :class:`~sdediff.schedules.DiscreteVP` of the scheduler's betas (``linear``,
  ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid`` recomputed in float64 from the config, or the
  config's ``trained_betas``); ``rescale_betas_zero_snr`` is refused (its last beta is 1: alpha_T = 0 has
  no finite log-SNR);
* the model calls the U-Net with diffusers' timestep index for sdediff's continuous time. DDPM's
  training step ``k`` (0-based, ``alphas_cumprod[k]``) is sdediff's grid time ``t = (k + 1) / N``, so
  the index is ``u = t N - 1``, snapped to the nearest integer when within 1e-3 of it (float32 times on
  the grid then call the network with exactly ``k``). **Off the grid** (continuous samplers, the PF-ODE)
  the network gets the fractional index ``u``: diffusers' sinusoidal timestep embedding is defined for
  real timesteps, so this interpolates the embedding smoothly between the trained steps; ``u`` is clamped
  to ``[0, N - 1]`` (below the first training time, the network at step 0);
* the prediction kind follows ``prediction_type`` (``epsilon`` -> eps, ``sample`` -> x0,
  ``v_prediction`` -> v); ``variance_type="learned_range"`` models (twice the channels out) become
  learned-variance models (:mod:`sdediff.variance` uses the same log interpolation), ``"learned"`` is
  refused; ``model.diffusers["variance"]`` names the ancestral variance the scheduler would use;
* ``clip_sample`` / ``thresholding`` are honoured by default through :class:`~sdediff.models.ClippedModel`
  (x0 clipped before every use, as diffusers' DDPM step does); ``clip=False`` turns them off (the
  likelihood command does: clipping is not part of the model's density).

Only local files are read, through diffusers' own ``from_pretrained(..., local_files_only=True,
use_safetensors=True)``: no network, no pickle. The folder's JSON is read as data; the classes built are
chosen from the allow-lists below, never from the files' ``_class_name``.

bits/dim of a diffusers model follow sdediff's convention (:mod:`sdediff.likelihood`): data in [-1, 1]
(diffusers' DDPMs are trained on ``2 x / 255 - 1``), uniform dequantization, and the PF-ODE from the
first grid time ``t_eps = 1/N`` of the DiscreteVP. score_sde's 3.28 bits/dim for DDPM CIFAR-10 used a
continuous linear VP-SDE with ``t_eps = 1e-5`` and index ``999 t``; our number for the same weights is on
the exact discrete chain and starts one training step in, so the two are close but not the same quantity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .models import ClippedModel, Model
from .nets.embedding import check_class_labels, refuse_class_labels
from .schedules import DiscreteVP
from .sde import SDE

__all__ = ["DiffusersError", "DiffusersUNet", "from_diffusers", "SCHEDULERS"]

#: scheduler classes whose config means DDPM's beta chain
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
#: network classes we can call as ``unet(x, timestep).sample``
UNETS = ("UNet2DModel",)
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE = {
    "fixed_small": "small",
    "fixed_small_log": "small",
    "fixed_large": "large",
    "fixed_large_log": "large",
    "learned_range": "learned",
}
INSTALL = "install the extra: pip install 'sdediff[diffusers]'"
SNAP = 1e-3  # times within this many steps of a training step call the network at that step exactly


class DiffusersError(ConfigError):
    """A diffusers folder or object sdediff cannot use (missing file, foreign class, unsupported value)."""


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DiffusersError(f"loading a diffusers model needs the diffusers package: {INSTALL}") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """``net(x, t)`` for sdediff: a diffusers ``UNet2DModel`` called at the timestep index ``t N - 1``
    (see the module docstring for the off-grid rule)."""

    def __init__(self, unet: nn.Module, N: int, learn_variance: bool = False):
        super().__init__()
        self.unet = unet
        self.N = int(N)
        self.learn_variance = learn_variance
        # a class embedding of n rows (config num_class_embeds): classes 0..n-2, row n-1 the null class
        # (sdediff's convention: label K of a K-class net is the unconditional one)
        n_embeds = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        self.num_classes = int(n_embeds) - 1 if n_embeds else 0

    def index(self, t: Tensor) -> Tensor:
        """The (float32) diffusers timestep for sdediff times ``t``."""
        u = t.to(torch.float64) * self.N - 1.0
        r = torch.round(u)
        u = torch.where((u - r).abs() <= SNAP, r, u)
        return u.clamp(0.0, self.N - 1.0).to(torch.float32)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        p = next(self.unet.parameters())
        kw = {}
        if self.num_classes:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
            else:
                check_class_labels(class_labels, x.shape[0], self.num_classes, "from_diffusers")
            kw["class_labels"] = class_labels.to(x.device)
        else:
            refuse_class_labels(class_labels, "from_diffusers")
        out = self.unet(x.to(p.dtype), self.index(t).to(x.device), return_dict=False, **kw)[0]
        return out.to(x.dtype)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DiffusersError(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersError(
            f"{path} is not readable JSON ({type(e).__name__}: {e}); the folder is corrupt"
        ) from None
    if not isinstance(data, dict):
        raise DiffusersError(f"{path} must hold a JSON object; the folder is corrupt")
    return data


def _check_folder(root: Path) -> tuple[str, dict, dict]:
    """(scheduler class, unet config, scheduler config) of a pipeline folder, or one line of why not."""
    if not root.is_dir():
        raise DiffusersError(f"diffusers folder {root} does not exist (give a local pipeline folder)")
    index = _read_json(
        root / "model_index.json", "not a diffusers pipeline folder (save one with save_pretrained)"
    )
    for part in ("unet", "scheduler"):
        if part not in index:
            raise DiffusersError(
                f"{root}/model_index.json names no {part!r}: sdediff needs a U-Net DDPM pipeline"
            )
    ucfg = _read_json(root / "unet" / "config.json", "the U-Net's config")
    scfg = _read_json(root / "scheduler" / "scheduler_config.json", "the scheduler's config")
    ucls, scls = str(ucfg.get("_class_name")), str(scfg.get("_class_name"))
    if ucls not in UNETS:
        raise DiffusersError(
            f"{root}/unet is a {ucls}; sdediff loads unconditional {', '.join(UNETS)} networks only"
        )
    if scls not in SCHEDULERS:
        raise DiffusersError(
            f"{root}/scheduler is a {scls}; sdediff reads DDPM's beta chain from {', '.join(SCHEDULERS)} only"
        )
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        pickled = (root / "unet" / "diffusion_pytorch_model.bin").is_file()
        raise DiffusersError(
            f"{weights} is missing"
            + (
                " (the folder holds pickle weights, which sdediff never loads: convert them to safetensors)"
                if pickled
                else ""
            )
        )
    return scls, ucfg, scfg


#: the most training steps a scheduler config may name (beyond it the betas alone would take gigabytes)
MAX_TRAIN_TIMESTEPS = 1_000_000
#: scheduler fields read here, with their type and allowed range: (kind, low, high)
_FIELDS = {
    "beta_start": ("number", 0.0, 1.0),
    "beta_end": ("number", 0.0, 1.0),
    "clip_sample_range": ("number", 0.0, None),
    "dynamic_thresholding_ratio": ("number", 0.0, 1.0),
    "sample_max_value": ("number", 0.0, None),
    "prediction_type": ("name", None, None),
    "variance_type": ("name", None, None),
    "beta_schedule": ("name", None, None),
    "clip_sample": ("flag", None, None),
    "thresholding": ("flag", None, None),
    "rescale_betas_zero_snr": ("flag", None, None),
}


def _check_fields(cfg: dict, where: str) -> None:
    """Every scheduler field this module reads has the right type and range (one line naming the field),
    before anything is computed from it."""
    N = cfg.get("num_train_timesteps", 1000)
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N <= MAX_TRAIN_TIMESTEPS:
        raise DiffusersError(
            f"{where}: num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS:g}], got {N!r}"
        )
    for key, (kind, lo, hi) in _FIELDS.items():
        if key not in cfg or cfg[key] is None:
            continue
        v = cfg[key]
        if kind == "flag" and not isinstance(v, bool):
            raise DiffusersError(f"{where}: {key} must be true or false, got {v!r}")
        if kind == "name" and not isinstance(v, str):
            raise DiffusersError(f"{where}: {key} must be a string, got {v!r}")
        if kind == "number":
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DiffusersError(f"{where}: {key} must be a finite number, got {v!r}")
            if v <= lo or (hi is not None and v > hi):
                rng = f"(0, {hi:g}]" if hi is not None else "> 0"
                raise DiffusersError(f"{where}: {key} must be in {rng}, got {v!r}")
    trained = cfg.get("trained_betas")
    if trained is not None:
        ok = isinstance(trained, list) and all(
            not isinstance(b, bool) and isinstance(b, int | float) and math.isfinite(b) and 0 < b < 1
            for b in trained
        )
        if not ok:
            shown = repr(trained) if len(repr(trained)) < 60 else repr(trained)[:57] + "..."
            raise DiffusersError(f"{where}: trained_betas must be a list of numbers in (0, 1), got {shown}")


def _betas(cfg: dict, where: str) -> Tensor:
    """DDPM's betas of a scheduler config, in float64."""
    _check_fields(cfg, where)
    N = cfg.get("num_train_timesteps", 1000)
    if cfg.get("rescale_betas_zero_snr"):
        raise DiffusersError(
            f"{where}: rescale_betas_zero_snr=True makes the last beta 1 (alpha_T = 0, an infinite log-SNR), "
            "which a VP-SDE cannot represent; use a scheduler without it"
        )
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).flatten()
        if betas.numel() != N:
            raise DiffusersError(
                f"{where}: trained_betas holds {betas.numel()} values, not num_train_timesteps={N}"
            )
        return betas
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(b0, b1, N, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, N, dtype=torch.float64) ** 2
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, N, dtype=torch.float64)) * (b1 - b0) + b0
    if kind == "squaredcos_cap_v2":

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / N) / abar(i / N), 0.999) for i in range(N)], dtype=torch.float64
        )
    raise DiffusersError(
        f"{where}: beta_schedule={kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2, "
        "sigmoid or trained_betas)"
    )


def _option(cfg: dict, key: str, table: dict, where: str, default: str) -> str:
    value = cfg.get(key, default)
    if value not in table:
        raise DiffusersError(f"{where}: {key}={value!r} is not supported ({', '.join(table)})")
    return table[value]


def from_diffusers(
    source: str | Path | None = None,
    *,
    unet: nn.Module | None = None,
    scheduler: Any = None,
    clip: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Model, SDE]:
    """``(model, sde)`` of a diffusers DDPM: a local pipeline folder, or ``unet=`` and ``scheduler=``.

    Args:
        source: a local folder holding ``model_index.json``, ``unet/`` and ``scheduler/``.
        unet, scheduler: a ``UNet2DModel`` and a DDPM/DDIM/PNDM scheduler already in memory (instead of
            ``source``).
        clip: ``None`` follows the scheduler's ``clip_sample`` / ``thresholding``; ``False`` turns them
            off; ``True`` turns clipping on (the scheduler's range, default 1).
        device, dtype: where the network goes (its weights' dtype stays unless ``dtype`` is given).

    Returns:
        ``(model, sde)``; ``model.diffusers`` records what was read (``N``, ``prediction_type``,
        ``variance`` — the ancestral variance the scheduler uses — ``clip``, ``item_shape``, ``source``).

    Raises:
        DiffusersError: one line naming what is missing or unsupported, before the weights are read.
    """
    if (source is None) == (unet is None or scheduler is None):
        raise DiffusersError("from_diffusers: give a folder, or both unet= and scheduler= (not both)")
    if source is not None:
        root = Path(source).expanduser()
        scls, ucfg, scfg = _check_folder(root)
        where = str(root / "scheduler")
    else:
        scls, ucfg, scfg = type(scheduler).__name__, dict(getattr(unet, "config", {})), dict(scheduler.config)
        ucls = type(unet).__name__
        if ucls not in UNETS:
            raise DiffusersError(
                f"unet is a {ucls}; sdediff loads unconditional {', '.join(UNETS)} networks only"
            )
        if scls not in SCHEDULERS:
            raise DiffusersError(
                f"scheduler is a {scls}; sdediff reads DDPM's beta chain from {', '.join(SCHEDULERS)} only"
            )
        where = f"the {scls}"
    # everything checked on the configs before the weights are read
    betas = _betas(scfg, where)
    prediction = _option(scfg, "prediction_type", PREDICTION, where, "epsilon")
    if scls == "DDPMScheduler":
        variance = _option(scfg, "variance_type", VARIANCE, where, "fixed_small")
    else:  # DDIM / PNDM have no variance option; DDIM's eta = 1 is the posterior's beta-tilde
        variance = "small"
    learn_variance = variance == "learned"
    if ucfg.get("class_embed_type") is not None:
        raise DiffusersError(
            f"the U-Net's class_embed_type is {ucfg.get('class_embed_type')!r}; sdediff loads unconditional "
            "U-Nets and class-conditional ones with a plain class table (num_class_embeds, last row = null)"
        )
    n_embeds = ucfg.get("num_class_embeds")
    if n_embeds is not None and (isinstance(n_embeds, bool) or not isinstance(n_embeds, int) or n_embeds < 2):
        raise DiffusersError(
            f"the U-Net's num_class_embeds is {n_embeds!r}; a class-conditional U-Net needs >= 2 rows "
            "(its classes and, last, the null class)"
        )
    c_in, c_out = ucfg.get("in_channels", 3), ucfg.get("out_channels", 3)
    if c_out != (2 if learn_variance else 1) * c_in:
        raise DiffusersError(
            f"the U-Net maps {c_in} channels to {c_out}, which does not fit variance_type="
            f"{scfg.get('variance_type', 'fixed_small')!r} "
            f"({'twice' if learn_variance else 'as many'} channels out)"
        )
    size = ucfg.get("sample_size")
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(size) != 2:
        raise DiffusersError(f"the U-Net's sample_size {ucfg.get('sample_size')!r} is not an image size")
    thresholding = bool(scfg.get("thresholding", False))
    clip_sample = bool(scfg.get("clip_sample", scls != "PNDMScheduler"))
    if clip is None:
        clip_on = thresholding or clip_sample
    elif isinstance(clip, bool):
        clip_on, thresholding = clip, thresholding and clip
    else:
        raise DiffusersError(f"from_diffusers: clip must be None, True or False, got {clip!r}")
    if source is not None:
        diffusers = _import_diffusers()
        try:
            unet = diffusers.UNet2DModel.from_pretrained(
                str(root),
                subfolder="unet",
                local_files_only=True,
                use_safetensors=True,
                low_cpu_mem_usage=False,
            )
        except Exception as e:  # noqa: BLE001 - any failure to read the weights is one line
            raise DiffusersError(
                f"{root}/unet could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        try:
            scheduler = getattr(diffusers, scls).from_config(scfg)
        except Exception as e:  # noqa: BLE001
            raise DiffusersError(
                f"{where} could not be read ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    unet = unet.eval()
    if device is not None or dtype is not None:
        unet = unet.to(device=device, dtype=dtype)
    sde = SDE(DiscreteVP(betas))
    ref = getattr(scheduler, "betas", None)
    if ref is not None and not torch.allclose(
        torch.as_tensor(ref, dtype=torch.float64), betas, rtol=1e-5, atol=1e-8
    ):
        raise DiffusersError(
            f"{where}: its betas differ from its config's {scfg.get('beta_schedule')!r} schedule"
        )
    net = DiffusersUNet(unet, betas.numel(), learn_variance)
    model: Model = Model(net, prediction, learn_variance=learn_variance)
    clip_desc = None
    if clip_on:
        if thresholding:
            th = (
                float(scfg.get("dynamic_thresholding_ratio", 0.995)),
                float(scfg.get("sample_max_value", 1.0)),
            )
            model = ClippedModel(model, sde, thresholding=th)
            clip_desc = f"thresholding ratio {th[0]}, max {th[1]}"
        else:
            rng = float(scfg.get("clip_sample_range", 1.0))
            model = ClippedModel(model, sde, clip_range=rng)
            clip_desc = f"x0 clipped to [-{rng:g}, {rng:g}]"
    model.diffusers = {
        "source": str(source) if source is not None else "in memory",
        "scheduler": scls,
        "N": betas.numel(),
        "prediction_type": scfg.get("prediction_type", "epsilon"),
        "variance": variance,
        "clip": clip_desc,
        "item_shape": (int(c_in), int(size[0]), int(size[1])),
    }
    return model, sde
