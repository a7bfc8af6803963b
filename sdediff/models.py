"""A network (or any callable ``net(x, t)``) together with what it predicts.

The four parameterisations are tied together by the schedule's (alpha, sigma) at time t:

    x = alpha x0 + sigma eps,   score = -eps / sigma,   v = alpha eps - sigma x0

and converted by the one table of :mod:`sdediff.parameterization`.

A :class:`Model` declares one of ``"eps"``, ``"x0"``, ``"score"``, ``"v"`` or the preconditioned
``"edm"`` (Karras et al. 2022: ``x0 = c_skip x + c_out net(c_in x, c_noise)``, with the data's standard
deviation ``sigma_data``; see :mod:`sdediff.parameterization`); everything else asks it for the kind it
needs (``model.eps(x, t, sde)``, ``model.x0(...)``, ``model.predict(x, t, sde, kind)``). A bare
callable passed where a model is expected is taken to be an eps-predictor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import ArgumentError
from .parameterization import KINDS, PRECONDITIONED, PREDICTIONS, check_kind, check_sigma_data, convert
from .sde import SDE, append_dims, coef_dtype

__all__ = [
    "Model",
    "ClippedModel",
    "as_model",
    "convert",
    "raw_net",
    "data_sigma",
    "PREDICTIONS",
    "KINDS",
    "C_NOISE",
]

#: what :class:`Model` passes to the net as its second argument: the time itself, the log-SNR
#: lambda(t), or EDM's 1/4 log sigma generalised to 1/4 log(sigma/alpha) = -lambda/8
C_NOISE = ("t", "log_snr", "log_sigma")
#: |lambda| is clipped here for the net's noise input (sigma = 0 at t = 0 gives lambda = inf)
LAMBDA_CLIP = 40.0


class Model(nn.Module):
    """Wrap ``net(x, t) -> prediction`` with its prediction kind.

    Args:
        net: an ``nn.Module`` or any callable taking the state ``x`` of shape ``(B, ...)`` and the
            continuous times ``t`` of shape ``(B,)`` (in x's dtype) and returning a tensor like ``x``.
        prediction: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"score"``, ``"v"``, or ``"edm"``: the
            preconditioned residual ``F`` of ``x0 = c_skip x + c_out F(c_in x, c_noise)`` with
            ``r^2 = alpha^2 sigma_data^2 + sigma^2``, ``c_skip = alpha sigma_data^2 / r^2``,
            ``c_out = sigma sigma_data / r``, ``c_in = 1 / r`` (EDM's at alpha = 1). A zero net is then the
            exact denoiser of Gaussian data with standard deviation ``sigma_data``, so the model stays
            linear in x wherever the net has learnt nothing (no ODE trajectory is ejected from regions the
            net never saw).
        learn_variance: the net also outputs improved DDPM's variance interpolation ``v``: it returns
            ``cat([prediction, v], dim=1)`` (twice x's size along dim 1, as the nets' ``learn_variance``
            and diffusers' ``learned_range`` models do). Every prediction method sees the first half;
            :meth:`predict_with_v` returns both (see :mod:`sdediff.variance`).
        sigma_data: the data's standard deviation (per dimension, a number > 0); required for
            ``prediction="edm"`` (:func:`data_sigma` estimates it from training data), stored (and
            unused) otherwise.
        c_noise: the net's second argument: ``"t"`` (the time as given, default: the nets' own
            ``time_input`` then decides between t and log-SNR features, the same under every
            prediction kind), ``"log_snr"`` (lambda(t), clipped to +-40) or ``"log_sigma"`` (EDM's
            ``1/4 log sigma`` as ``1/4 log(sigma/alpha) = -lambda/8``, for nets written for EDM).

    :meth:`forward` is the bare net call on the inputs as given; :meth:`predict` (and :meth:`eps`,
    :meth:`x0`, ...) apply the input map (``c_in``, ``c_noise``) and the output conversion.
    """

    def __init__(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        prediction: str = "eps",
        learn_variance: bool = False,
        sigma_data: float | None = None,
        c_noise: str = "t",
    ):
        super().__init__()
        check_kind(prediction)
        if prediction == PRECONDITIONED or sigma_data is not None:
            sigma_data = check_sigma_data(sigma_data, "Model")
        if c_noise not in C_NOISE:
            raise ArgumentError("c_noise", c_noise, f"must be one of {C_NOISE}", "Model")
        if not isinstance(learn_variance, bool):
            raise TypeError(f"learn_variance must be True or False, got {learn_variance!r}")
        net_lv = getattr(net, "learn_variance", None)
        if isinstance(net_lv, bool) and net_lv != learn_variance:
            raise ValueError(
                f"the net was built with learn_variance={net_lv} but the Model with learn_variance="
                f"{learn_variance}; set both the same (model.learn_variance in the config)"
            )
        self.learn_variance = learn_variance
        if isinstance(net, Model):
            raise TypeError("net is already a Model; pass it directly")
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t), got {type(net).__name__}")
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self._fn = net
        self.prediction = prediction
        self.sigma_data, self.c_noise = sigma_data, c_noise

    def extra_repr(self) -> str:
        extra = f", sigma_data={self.sigma_data:g}" if self.sigma_data is not None else ""
        extra += f", c_noise={self.c_noise!r}" if self.c_noise != "t" else ""
        return (
            f"prediction={self.prediction!r}"
            + extra
            + (", learn_variance=True" if self.learn_variance else "")
        )

    @property
    def bare(self) -> bool:
        """Whether the net is called on ``(x, t)`` unchanged (no input scaling, no noise feature): then the
        samplers may call it directly (:func:`raw_net`)."""
        return self.prediction in PREDICTIONS and self.c_noise == "t"

    def with_net(self, net) -> Model:
        """A :class:`Model` like this one (kind, variance output, sigma_data, c_noise) around another net,
        e.g. ``model.with_net(DDP(model.net))`` or ``model.with_net(torch.compile(model.net))``."""
        return Model(net, self.prediction, self.learn_variance, self.sigma_data, self.c_noise)

    def net_inputs(self, x: Tensor, t, sde: SDE) -> tuple[Tensor, Tensor]:
        """``(c_in x, c_noise)``: what the net is called on at state ``x`` and times ``t`` (elementwise on
        x's device, no host syncs; schedule values in float64, the net's inputs in x's dtype)."""
        tb = _batch_times(t, x)
        if self.bare:
            return x, tb
        t64 = torch.as_tensor(t, device=x.device)
        if t64.ndim == 0:
            t64 = t64.expand(x.shape[0])
        x_in = x
        if self.prediction == PRECONDITIONED:
            alpha, sigma = sde.marginal(t64)
            d = self.sigma_data
            c_in = torch.rsqrt(alpha * alpha * (d * d) + sigma * sigma)
            x_in = (x * append_dims(c_in.to(x.device, coef_dtype(x)), x.ndim)).to(x.dtype)
        if self.c_noise == "t":
            return x_in, tb
        lam = sde.schedule.log_snr(t64).clamp(-LAMBDA_CLIP, LAMBDA_CLIP)
        c = lam if self.c_noise == "log_snr" else lam * -0.125
        return x_in, c.to(x.device, tb.dtype)

    @property
    def num_classes(self) -> int:
        """``K`` of a class-conditional net (its ``num_classes``; label ``K`` is the null class), else 0."""
        return int(getattr(self.net if "net" in self._modules else self._fn, "num_classes", 0) or 0)

    def _call_full(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        net = self.net if "net" in self._modules else self._fn
        out = net(x, t) if class_labels is None else net(x, t, class_labels=class_labels)
        if not self.learn_variance:
            return out, None
        if out.ndim < 2 or out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"a learn_variance model's net must return cat([prediction, v], dim=1) of shape "
                f"{(x.shape[0], 2 * x.shape[1], *x.shape[2:])}, got {tuple(out.shape)}"
            )
        mean, v = out.chunk(2, dim=1)
        return mean, v

    def _call_net(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self._call_full(x, t, class_labels)[0]

    def predict_with_v(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(prediction of kind, v)`` from one network call; ``v`` is None unless :attr:`learn_variance`."""
        check_kind(kind, "kind")
        out, v = self._call_full(*self.net_inputs(x, t, sde), class_labels)
        return self._convert(out, x, t, sde, kind), v

    def forward(self, x: Tensor, t, with_v: bool = False, class_labels: Tensor | None = None):
        """The bare network output (of kind :attr:`prediction`) on the inputs as given (per-sample times,
        or the net inputs of :meth:`net_inputs` for a preconditioned model); with ``with_v`` the pair
        ``(prediction, v)`` (``v`` None unless :attr:`learn_variance`)."""
        if with_v:
            return self._call_full(x, _batch_times(t, x), class_labels)
        return self._call_net(x, _batch_times(t, x), class_labels)

    def predict(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> Tensor:
        """The prediction of kind ``kind`` at ``(x, t)`` under ``sde``; ``class_labels`` (int64 ``(B,)``,
        or None for the unconditional prediction) go to a class-conditional net by keyword."""
        check_kind(kind, "kind")
        return self._convert(self._call_net(*self.net_inputs(x, t, sde), class_labels), x, t, sde, kind)

    def _convert(self, out: Tensor, x: Tensor, t, sde: SDE, kind: str) -> Tensor:
        return _to_kind(out, self.prediction, x, t, sde, kind, self.sigma_data)

    def eps(self, x: Tensor, t, sde: SDE, class_labels: Tensor | None = None) -> Tensor:
        return self.predict(x, t, sde, "eps", **labels_kw(class_labels))

    def x0(self, x: Tensor, t, sde: SDE, class_labels: Tensor | None = None) -> Tensor:
        return self.predict(x, t, sde, "x0", **labels_kw(class_labels))

    def score(self, x: Tensor, t, sde: SDE, class_labels: Tensor | None = None) -> Tensor:
        return self.predict(x, t, sde, "score", **labels_kw(class_labels))

    def v(self, x: Tensor, t, sde: SDE, class_labels: Tensor | None = None) -> Tensor:
        return self.predict(x, t, sde, "v", **labels_kw(class_labels))


def labels_kw(class_labels) -> dict:
    """``{"class_labels": ...}`` when there are labels, else ``{}``: a ``Model`` subclass written before
    conditioning (``predict(x, t, sde, kind)``) keeps working wherever no labels are passed."""
    return {} if class_labels is None else {"class_labels": class_labels}


def _to_kind(out: Tensor, source: str, x: Tensor, t, sde: SDE, kind: str, sigma_data=None) -> Tensor:
    """``out`` (a prediction of kind ``source`` at ``(x, t)``) as kind ``kind``."""
    if kind == source:
        return out
    # coefficients from the times as given (float64 grids stay exact), not the net's cast copy
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    alpha, sigma = sde.marginal(t)
    dt = coef_dtype(x)
    alpha = append_dims(alpha.to(x.device, dt), x.ndim)
    sigma = append_dims(sigma.to(x.device, dt), x.ndim)
    return convert(out, x, alpha, sigma, source, kind, sigma_data=sigma_data)


def _batch_times(t, x: Tensor) -> Tensor:
    """Times as a ``(B,)`` tensor in x's dtype (float32 for half types) on x's device."""
    dt = coef_dtype(x) if x.is_floating_point() else torch.float32
    t = torch.as_tensor(t, device=x.device, dtype=dt)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"times must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def as_model(obj) -> Model:
    """A :class:`Model` as is; any other callable is taken to be an eps-predictor.

    A :class:`Model` wrapped by ``torch.compile`` or ``DistributedDataParallel`` keeps its prediction
    kind: the wrapper is still what gets called, so compilation and gradient synchronisation apply.
    """
    if isinstance(obj, Model):
        return obj
    inner = getattr(obj, "_orig_mod", None)  # torch.compile's OptimizedModule
    if not isinstance(inner, Model):
        inner = getattr(obj, "module", None)  # DistributedDataParallel / DataParallel
    if isinstance(inner, Model):
        return _Wrapped(obj, inner)
    return Model(obj, "eps")


class _Wrapped(Model):
    """A compiled or DDP-wrapped :class:`Model`: calls go through the wrapper, whose output is already
    the inner model's native prediction (its variance half split off)."""

    def __init__(self, wrapper, inner: Model):
        super().__init__(wrapper, inner.prediction, sigma_data=inner.sigma_data, c_noise=inner.c_noise)
        self.learn_variance = inner.learn_variance
        self._num_classes = inner.num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _call_full(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        kw = {} if class_labels is None else {"class_labels": class_labels}
        if self.learn_variance:
            return self.net(x, t, with_v=True, **kw)
        return self.net(x, t, **kw), None


class ClippedModel(Model):
    """A model whose x0 estimate is clipped (or dynamically thresholded) before anything uses it.

    Every prediction kind is then derived from the clipped ``x0`` through the parameterisation table,
    so the model stays self-consistent: an ancestral step's posterior mean uses the clipped x0 exactly as
    diffusers' ``DDPMScheduler`` does (``clip_sample`` / ``thresholding``), and DDIM with eta = 0 equals
    diffusers' ``DDIMScheduler`` with ``use_clipped_model_output=True`` (that scheduler's default pairs
    the clipped x0 with the *unclipped* eps, which no single model -- and no ODE -- can express).

    Args:
        model: the :class:`Model` to clip (kept, not copied).
        sde: the SDE whose (alpha, sigma) relate the kinds (needed by :meth:`forward`, which has no sde).
        clip_range: clamp x0 to ``[-clip_range, clip_range]`` (diffusers' ``clip_sample_range``).
        thresholding: ``None`` or ``(ratio, max_value)``: Imagen's dynamic thresholding as diffusers
            implements it -- per sample, ``s`` = the ``ratio`` quantile of ``|x0|`` clamped to
            ``[1, max_value]``, then ``x0 = clamp(x0, -s, s) / s``; it replaces ``clip_range``.
    """

    def __init__(self, model: Model, sde: SDE, clip_range: float = 1.0, thresholding=None):
        model = as_model(model)
        nn.Module.__init__(self)  # not Model.__init__: the inner model is the net, called through predict
        self.inner = model
        self.prediction = model.prediction
        self.learn_variance = model.learn_variance
        self.sigma_data, self.c_noise = model.sigma_data, model.c_noise
        self.sde = sde
        if thresholding is not None:
            ratio, max_value = (float(v) for v in thresholding)
            if not (0.0 < ratio <= 1.0 and max_value >= 1.0):
                raise ValueError(
                    f"thresholding needs 0 < ratio <= 1 and max_value >= 1, got ({ratio}, {max_value})"
                )
            self.thresholding = (ratio, max_value)
            self.clip_range = None
        else:
            clip_range = float(clip_range)
            if not clip_range > 0.0:
                raise ValueError(f"clip_range must be > 0, got {clip_range}")
            self.thresholding, self.clip_range = None, clip_range

    def extra_repr(self) -> str:
        how = f"thresholding={self.thresholding}" if self.thresholding else f"clip_range={self.clip_range}"
        return f"prediction={self.prediction!r}, {how}"

    def clip(self, x0: Tensor) -> Tensor:
        """The clipped (or thresholded) ``x0``."""
        if self.thresholding is None:
            return x0.clamp(-self.clip_range, self.clip_range)
        ratio, max_value = self.thresholding
        flat = x0.flatten(1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value).unsqueeze(1)
        return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).view_as(x0)

    @property
    def num_classes(self) -> int:
        return self.inner.num_classes

    def predict_with_v(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        check_kind(kind, "kind")
        x0, v = self.inner.predict_with_v(x, t, sde, "x0", **labels_kw(class_labels))
        return _to_kind(self.clip(x0), "x0", x, t, sde, kind, self.sigma_data), v

    def predict(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> Tensor:
        check_kind(kind, "kind")
        x0 = self.clip(self.inner.predict(x, t, sde, "x0", **labels_kw(class_labels)))
        return _to_kind(x0, "x0", x, t, sde, kind, self.sigma_data)

    def forward(self, x: Tensor, t, with_v: bool = False, class_labels: Tensor | None = None):
        out, v = self.predict_with_v(x, t, self.sde, self.prediction, **labels_kw(class_labels))
        return (out, v) if with_v else out


def raw_net(model: Model):
    """The bare network call ``net(x, t)`` of a plain :class:`Model`, for samplers that fold the
    prediction-kind conversion into precomputed step coefficients; ``None`` when a subclass overrides
    ``predict`` or ``forward``, or when the net's inputs are not ``(x, t)`` themselves (a preconditioned
    ``"edm"`` model, a ``c_noise`` other than ``"t"``): its behaviour must then be honoured through
    :meth:`Model.predict` (the samplers' evaluator asks it for x0 at float64 times, elementwise, and
    folds the x0 kind into its coefficients)."""
    if type(model).predict is Model.predict and type(model).forward is Model.forward and model.bare:
        return model._call_net
    return None


def data_sigma(x: Tensor, dequantize: bool = False) -> float:
    """The data's standard deviation for ``Model(..., prediction="edm", sigma_data=...)``: the square
    root of the per-dimension variance averaged over dimensions, ``sqrt(mean_j Var x_j)`` (float64).

    ``dequantize=True``: ``x`` holds 8-bit values on the lattice ``k / 127.5 - 1`` that training replaces
    by ``2 (k + u) / 256 - 1`` with ``u ~ U[0, 1)``; their exact variance ``(2/256)^2 (Var k + 1/12)``
    is used (no random draw, so a resumed run computes the same number)."""
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ArgumentError("data", tuple(x.shape), "must hold at least 2 items to estimate sigma_data")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ArgumentError("data", "non-finite", "must be finite (NaN or inf found) to estimate sigma_data")
    if dequantize:
        k = (x + 1.0) * 127.5
        var = (2.0 / 256.0) ** 2 * (k.var(0, unbiased=False) + 1.0 / 12.0)
    else:
        var = x.var(0, unbiased=False)
    s = math.sqrt(float(var.mean()))
    if not s > 0.0:
        raise ArgumentError("data", "constant", "must vary to estimate sigma_data (every item is equal)")
    return s
