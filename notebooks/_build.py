"""Writes the notebooks from their cell sources (run: python notebooks/_build.py). Outputs are not stored."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return nb


compare = [
    """md:# Comparing samplers on exact ground truth

Every sampler of `sdediff` is driven here with the **exact** eps-prediction of a known data law
(`sdediff.oracle.GaussianMixture`), so what we see is the sampler's own error and nothing else:
no training noise. Two measurements:

1. an 8-component 2-D Gaussian mixture, judged by the energy distance between samples and exact draws;
2. an anisotropic Gaussian in 16-D, where every *deterministic* sampler is an affine map
   `x_T -> A x_T + b`, so the KL of `N(b, A A^T)` to the data law is exact.

Set `SDEDIFF_NOTEBOOK_QUICK=1` to run it small (that is what the test-suite does).""",
    """import math
import os

import matplotlib.pyplot as plt
import torch

import sdediff as sd

QUICK = os.environ.get("SDEDIFF_NOTEBOOK_QUICK") == "1"
N_SAMPLES = 500 if QUICK else 4000
BUDGETS = [10, 20] if QUICK else [10, 20, 50, 100]
torch.manual_seed(0)""",
    """md:## The data and the schedule
DDPM's discrete linear chain (N = 1000) seen as a VP-SDE, and a ring of eight Gaussians.""",
    """sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
data = sd.oracle.GaussianMixture(means, torch.full((8, 2), 0.03, dtype=torch.float64))
model = sd.Model(data.model(sde), prediction="eps")
reference = data.sample(N_SAMPLES, generator=torch.Generator().manual_seed(1))


def energy_distance(x, y):
    \"\"\"Energy distance between two samples (0 iff the laws agree).\"\"\"
    d = lambda a, b: torch.cdist(a, b).mean()  # noqa: E731
    return float(2 * d(x, y) - d(x, x) - d(y, y))


floor = energy_distance(data.sample(N_SAMPLES, generator=torch.Generator().manual_seed(2)), reference)
print(f"energy distance between two exact samples (the floor): {floor:.4f}")""",
    """md:## Every sampler at several budgets of model evaluations""",
    """SAMPLER_OPTIONS = {
    "ancestral": {},
    "ddim (ancestral, eta=0)": {"sampler": "ancestral", "eta": 0.0},
    "euler_maruyama": {},
    "pf_ode (heun)": {"sampler": "pf_ode", "method": "heun"},
    "pc": {},
    "dpm_solver (3M)": {"sampler": "dpm_solver", "order": 3},
}
results, last = {}, {}
for label, opts in SAMPLER_OPTIONS.items():
    opts = dict(opts)
    name = opts.pop("sampler", label)
    for nfe in BUDGETS:
        steps = max(1, nfe // 2) if name in ("pf_ode", "pc") else nfe
        x, info = sd.sample(
            model, sde, sampler=name, steps=steps, shape=(N_SAMPLES, 2), dtype=torch.float64,
            generator=torch.Generator().manual_seed(3), return_info=True, **opts,
        )
        results[label, nfe] = (info.nfe, energy_distance(x, reference))
        last[label] = x
print(f"{'sampler':26s}" + "".join(f"{'budget ' + str(b):>16s}" for b in BUDGETS))
for label in SAMPLER_OPTIONS:
    cells = "".join(f"{results[label, b][1]:>10.4f} ({results[label, b][0]:>3d})" for b in BUDGETS)
    print(f"{label:26s}{cells}")
print("(energy distance to exact samples, actual NFE in brackets)")""",
    """fig, axes = plt.subplots(1, len(last) + 1, figsize=(3 * (len(last) + 1), 3), sharex=True, sharey=True)
axes[0].scatter(*reference.T, s=1)
axes[0].set_title("exact")
for ax, (label, x) in zip(axes[1:], last.items()):
    ax.scatter(*x.T, s=1)
    ax.set_title(f"{label}\\n{BUDGETS[-1]} NFE", fontsize=8)
plt.tight_layout()""",
    """md:## Exact KL for deterministic samplers on a Gaussian
With the exact score of Gaussian data, a deterministic sampler maps `x_T` affinely. Running it on the
zero vector and the basis vectors recovers `A` and `b`; the sampled law is `N(b, A A^T)`.""",
    """D = 16
g = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
eigs = torch.logspace(math.log10(0.01), math.log10(4.0), D, dtype=torch.float64)
cov = Q @ torch.diag(eigs) @ Q.T
gauss = sd.oracle.GaussianMixture(torch.zeros(D, dtype=torch.float64), cov)
gauss_model = sd.Model(gauss.model(sde))


def exact_kl(sampler, steps, **opts):
    probe = torch.cat([torch.zeros(1, D), torch.eye(D)]).to(torch.float64)
    out, info = sd.sample(gauss_model, sde, sampler=sampler, steps=steps, x_T=probe, return_info=True, **opts)
    b = out[0]
    A = (out[1:] - b).T  # column j is A e_j
    S = A @ A.T
    # KL(N(b, S) || N(0, cov))
    inv = torch.linalg.inv(cov)
    kl = 0.5 * (torch.trace(inv @ S) + b @ inv @ b - D + torch.logdet(cov) - torch.logdet(S))
    return float(kl), info.nfe


for label, (name, opts) in {
    "DDIM": ("ancestral", {"eta": 0.0}),
    "PF-ODE Euler": ("pf_ode", {"method": "euler"}),
    "PF-ODE Heun": ("pf_ode", {"method": "heun"}),
    "DPM-Solver++ 2M": ("dpm_solver", {"order": 2}),
    "DPM-Solver++ 3M": ("dpm_solver", {"order": 3}),
}.items():
    row = []
    for nfe in BUDGETS:
        steps = max(1, nfe // 2) if opts.get("method") == "heun" else nfe
        kl, used = exact_kl(name, steps, **opts)
        row.append(f"{kl:10.2e} ({used:>3d})")
    print(f"{label:18s}" + "".join(row))""",
    """md:## Likelihood through the probability-flow ODE
The same mixture's exact log-density against the PF-ODE estimate (exact trace in 2-D).""",
    """from sdediff.likelihood import log_likelihood

cont = sd.SDE(sd.LinearVP())
x = data.sample(64, generator=torch.Generator().manual_seed(5))
est = log_likelihood(data.model(cont), cont, x, trace="exact", rtol=1e-6, atol=1e-6)
truth = data.log_prob(x, 1e-5, cont)
print(f"mean |error| = {float((est.logp - truth).abs().mean()) / 2:.2e} nats/dim with {est.nfe} evaluations")""",
]

nbf.write(notebook(compare), HERE / "compare_samplers.ipynb")
print("wrote", HERE / "compare_samplers.ipynb")
