"""A network (or any callable ``net(x, t)``) together with what it predicts.

The four parameterisations are tied together by the schedule's (alpha, sigma) at time t:

    x = alpha x0 + sigma eps,   score = -eps / sigma,   v = alpha eps - sigma x0

and converted by the one table of :mod:`sdediff.parameterization`.

A :class:`Model` declares one of ``"eps"``, ``"x0"``, ``"score"``, ``"v"``; everything else asks it
for the kind it needs (``model.eps(x, t, sde)``, ``model.x0(...)``, ...). A bare callable passed where a
model is expected is taken to be an eps-predictor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .parameterization import PREDICTIONS, check_kind, convert
from .sde import SDE, append_dims, coef_dtype

__all__ = ["Model", "ClippedModel", "as_model", "convert", "raw_net", "PREDICTIONS"]


class Model(nn.Module):
    """Wrap ``net(x, t) -> prediction`` with its prediction kind.

    Args:
        net: an ``nn.Module`` or any callable taking the state ``x`` of shape ``(B, ...)`` and the
            continuous times ``t`` of shape ``(B,)`` (in x's dtype) and returning a tensor like ``x``.
        prediction: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"score"`` or ``"v"``.
        learn_variance: the net also outputs improved DDPM's variance interpolation ``v``: it returns
            ``cat([prediction, v], dim=1)`` (twice x's size along dim 1, as the nets' ``learn_variance``
            and diffusers' ``learned_range`` models do). Every prediction method sees the first half;
            :meth:`predict_with_v` returns both (see :mod:`sdediff.variance`).
    """

    def __init__(
        self, net: Callable[[Tensor, Tensor], Tensor], prediction: str = "eps", learn_variance: bool = False
    ):
        super().__init__()
        check_kind(prediction)
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

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}" + (", learn_variance=True" if self.learn_variance else "")

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
        out, v = self._call_full(x, _batch_times(t, x), class_labels)
        return self._convert(out, x, t, sde, kind), v

    def forward(self, x: Tensor, t, with_v: bool = False, class_labels: Tensor | None = None):
        """The raw network output (of kind :attr:`prediction`) for per-sample times; with ``with_v``
        the pair ``(prediction, v)`` (``v`` None unless :attr:`learn_variance`)."""
        if with_v:
            return self._call_full(x, _batch_times(t, x), class_labels)
        return self._call_net(x, _batch_times(t, x), class_labels)

    def predict(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> Tensor:
        """The prediction of kind ``kind`` at ``(x, t)`` under ``sde``; ``class_labels`` (int64 ``(B,)``,
        or None for the unconditional prediction) go to a class-conditional net by keyword."""
        check_kind(kind, "kind")
        return self._convert(self._call_net(x, _batch_times(t, x), class_labels), x, t, sde, kind)

    def _convert(self, out: Tensor, x: Tensor, t, sde: SDE, kind: str) -> Tensor:
        return _to_kind(out, self.prediction, x, t, sde, kind)

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


def _to_kind(out: Tensor, source: str, x: Tensor, t, sde: SDE, kind: str) -> Tensor:
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
    return convert(out, x, alpha, sigma, source, kind)


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
        super().__init__(wrapper, inner.prediction)
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
        return _to_kind(self.clip(x0), "x0", x, t, sde, kind), v

    def predict(
        self, x: Tensor, t, sde: SDE, kind: str = "eps", class_labels: Tensor | None = None
    ) -> Tensor:
        check_kind(kind, "kind")
        x0 = self.inner.predict(x, t, sde, "x0", **labels_kw(class_labels))
        return _to_kind(self.clip(x0), "x0", x, t, sde, kind)

    def forward(self, x: Tensor, t, with_v: bool = False, class_labels: Tensor | None = None):
        out, v = self.predict_with_v(x, t, self.sde, self.prediction, **labels_kw(class_labels))
        return (out, v) if with_v else out


def raw_net(model: Model):
    """The bare network call ``net(x, t)`` of a plain :class:`Model`, for samplers that fold the
    prediction-kind conversion into precomputed step coefficients; ``None`` when a subclass overrides
    ``predict`` or ``forward``, whose behaviour must then be honoured through :meth:`Model.predict`."""
    if type(model).predict is Model.predict and type(model).forward is Model.forward:
        return model._call_net
    return None
