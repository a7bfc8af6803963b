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

__all__ = ["Model", "as_model", "convert", "raw_net", "PREDICTIONS"]


class Model(nn.Module):
    """Wrap ``net(x, t) -> prediction`` with its prediction kind.

    Args:
        net: an ``nn.Module`` or any callable taking the state ``x`` of shape ``(B, ...)`` and the
            continuous times ``t`` of shape ``(B,)`` (in x's dtype) and returning a tensor like ``x``.
        prediction: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"score"`` or ``"v"``.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], prediction: str = "eps"):
        super().__init__()
        check_kind(prediction)
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
        return f"prediction={self.prediction!r}"

    def _call_net(self, x: Tensor, t: Tensor) -> Tensor:
        net = self.net if "net" in self._modules else self._fn
        return net(x, t)

    def forward(self, x: Tensor, t) -> Tensor:
        """The raw network output (of kind :attr:`prediction`) for per-sample times."""
        return self._call_net(x, _batch_times(t, x))

    def predict(self, x: Tensor, t, sde: SDE, kind: str = "eps") -> Tensor:
        """The prediction of kind ``kind`` at ``(x, t)`` under ``sde``."""
        check_kind(kind, "kind")
        out = self._call_net(x, _batch_times(t, x))
        if kind == self.prediction:
            return out
        # coefficients from the times as given (float64 grids stay exact), not the net's cast copy
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = sde.marginal(t)
        dt = coef_dtype(x)
        alpha = append_dims(alpha.to(x.device, dt), x.ndim)
        sigma = append_dims(sigma.to(x.device, dt), x.ndim)
        return convert(out, x, alpha, sigma, self.prediction, kind)

    def eps(self, x: Tensor, t, sde: SDE) -> Tensor:
        return self.predict(x, t, sde, "eps")

    def x0(self, x: Tensor, t, sde: SDE) -> Tensor:
        return self.predict(x, t, sde, "x0")

    def score(self, x: Tensor, t, sde: SDE) -> Tensor:
        return self.predict(x, t, sde, "score")

    def v(self, x: Tensor, t, sde: SDE) -> Tensor:
        return self.predict(x, t, sde, "v")


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
        return Model(obj, inner.prediction)
    return Model(obj, "eps")


def raw_net(model: Model):
    """The bare network call ``net(x, t)`` of a plain :class:`Model`, for samplers that fold the
    prediction-kind conversion into precomputed step coefficients; ``None`` when a subclass overrides
    ``predict`` or ``forward``, whose behaviour must then be honoured through :meth:`Model.predict`."""
    if type(model).predict is Model.predict and type(model).forward is Model.forward:
        return model._call_net
    return None
