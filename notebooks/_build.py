"""Writes the notebooks from their cell sources and executes them, storing their outputs.

    python notebooks/_build.py           # full settings; writes the .ipynb files and notebooks/figures/*.png
    SDEDIFF_NOTEBOOK_QUICK=1 python notebooks/_build.py   # small settings (what the test-suite runs)

    python notebooks/_build.py 05_image_models   # only the notebooks whose names start so

Every figure is stored in the notebook as an inline image output (the kernel uses matplotlib's inline
backend), so a reader sees the plots on the repository page; full runs also save one figure per notebook
to ``notebooks/figures/`` (shown in the README).
"""

import os
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent

HEAD = """import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython import get_ipython

get_ipython().run_line_magic("matplotlib", "inline")  # every figure is stored in the notebook as an image

import sdediff as sd

QUICK = os.environ.get("SDEDIFF_NOTEBOOK_QUICK") == "1"
FIGURES = Path(os.environ.get("SDEDIFF_NOTEBOOK_FIGURES", "figures"))


def save(fig, name):
    \"\"\"Keep the figure for the README (full runs only).\"\"\"
    if not QUICK:
        FIGURES.mkdir(exist_ok=True)
        fig.savefig(FIGURES / name, dpi=110, bbox_inches="tight")


_ = torch.manual_seed(0)"""


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells
    ]
    return nb


DDPM = [
    """md:# Discrete DDPM is the VP-SDE seen on a grid

DDPM's chain `alphabar_i = prod_{j<=i} (1 - beta_j)` and the VP-SDE `dx = -beta(t)/2 x dt + sqrt(beta(t)) dW` are one
object in `sdediff`: `DiscreteVP` lets `log alpha(t)` interpolate linearly between `(i/N, 1/2 log alphabar_i)`,
so `beta(t) = -N log(1 - beta_i)` on each step and the SDE's marginal at `t_i` *is* DDPM's `q(x_i | x_0)`.
This notebook shows the schedules, checks the grid correspondence to machine precision, and checks the
forward marginals by simulating DDPM's chain.""",
    HEAD,
    """md:## Schedules: DDPM's chains next to their continuous limits""",
    """t = torch.linspace(0, 1, 1001, dtype=torch.float64)
pairs = {
    "linear": (sd.DiscreteVP.ddpm(1000), sd.LinearVP()),
    "cosine": (sd.DiscreteVP.ddpm(1000, kind="cosine"), sd.CosineVP()),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for name, (disc, cont) in pairs.items():
    tc = t.clamp(max=cont.T)
    axes[0].plot(t, disc.alpha(t), label=f"DDPM {name}")
    axes[0].plot(tc, cont.alpha(tc), "--", label=f"{type(cont).__name__}")
    axes[1].plot(t, disc.sigma(t), label=f"DDPM {name}")
    axes[1].plot(tc, cont.sigma(tc), "--")
    axes[2].plot(t[1:], disc.log_snr(t[1:]), label=f"DDPM {name}")
    axes[2].plot(tc[1:], cont.log_snr(tc[1:]), "--", label=type(cont).__name__)
for ax, name in zip(axes, ["alpha(t)", "sigma(t)", "log-SNR lambda(t)"]):
    ax.set_xlabel("t")
    ax.set_title(name)
axes[0].legend(fontsize=8)
fig.tight_layout()
save(fig, "ddpm_vs_vpsde.png")""",
    """md:## The grid correspondence is exact
`alpha(t_i)^2` of the SDE against DDPM's `alphabar_i` computed from the betas, and the DDPM posterior's
coefficients against the SDE's Gaussian posterior between grid times.""",
    """sch = sd.DiscreteVP.ddpm(1000)
sde = sd.SDE(sch)
betas = sch.betas
abar = torch.cumprod(1 - betas, 0)
grid = sch.timesteps
rel = ((sch.alpha(grid) ** 2 - abar) / abar).abs().max()
print(f"max relative error of alphabar on the grid: {float(rel):.1e}")
abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
beta_tilde = (1 - abar_prev) / (1 - abar) * betas
c_t, c_0, var = sde.posterior_coefficients(grid - 1 / 1000, grid)
print(f"max |beta-tilde - posterior variance|: {float((var - beta_tilde).abs().max()):.1e}")
print(f"max |DDPM's x_t coefficient - c_t|:     {float((c_t - (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar)).abs().max()):.1e}")""",
    """md:## Forward marginals: DDPM's chain simulated against q(x_t | x_0)""",
    """n = 2000 if QUICK else 20000
g = torch.Generator().manual_seed(0)
x0 = sd.data.toy2d("eight_gaussians", n, seed=0).double()
x = x0.clone()
checks = {100, 400, 1000}
for i in range(1, 1001):
    x = (1 - betas[i - 1]).sqrt() * x + betas[i - 1].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    if i in checks:
        direct, _ = sde.marginal_sample(x0, i / 1000, generator=g)
        se = direct.std(0) / math.sqrt(n)
        print(f"t = {i / 1000:.1f}: chain mean {x.mean(0).numpy().round(3)}, q(x_t|x_0) mean {direct.mean(0).numpy().round(3)}, "
              f"difference / stderr {((x.mean(0) - direct.mean(0)) / (se * math.sqrt(2))).abs().max():.2f}")""",
]

SAMPLERS = [
    """md:# Comparing samplers

Every sampler of `sdediff` on exact ground truth (the `sdediff.oracle` mixtures: no training noise, only the
sampler's own error) and on a toy model trained here, against the number of model evaluations (NFE). The same
comparison is one command away: `sdediff-compare oracle=gmm2d`.""",
    HEAD,
    """from sdediff.cli.compare import gaussian_kl, sliced_w2

sde = sd.SDE(sd.LinearVP())
ring = sd.oracle.ring_mixture()
n = 500 if QUICK else 4000
budgets = [5, 10, 20] if QUICK else [5, 10, 20, 50, 100]
repeats = 2 if QUICK else 4
x_Ts = [ring.sample_marginal(n, 1.0, sde, generator=torch.Generator().manual_seed(r)).float()  # exact p_T
        for r in range(repeats)]
exact = ring.sample(n, generator=torch.Generator().manual_seed(100)).float()
# sliced W2 between two exact sets of n points is not 0: its spread over draws is the metric's noise floor
floors = torch.tensor([sliced_w2(exact, ring.sample(n, generator=torch.Generator().manual_seed(200 + k)).float())
                       for k in range(8)])
samplers = {"ancestral": {}, "ddim (eta=0)": {"sampler": "ancestral", "eta": 0.0}, "euler_maruyama": {},
            "pf_ode (heun)": {"sampler": "pf_ode"}, "dpm_solver": {}}
results = {}
for label, opts in samplers.items():
    opts = dict(opts)
    name = opts.pop("sampler", label)
    for steps in budgets:
        dists = []
        for r, x_T in enumerate(x_Ts):
            x, info = sd.sample(ring.model(sde), sde, sampler=name, steps=steps, x_T=x_T, return_info=True,
                                generator=torch.Generator().manual_seed(300 + r), **opts)
            dists.append(sliced_w2(x, exact))
        results[label, steps] = (info.nfe, sum(dists) / len(dists), x)
print(f"sliced W2^2 of two exact sets of {n} points: mean {floors.mean():.2e}, "
      f"range {floors.min():.2e} .. {floors.max():.2e} over {len(floors)} draws")
print(f"{'sampler':16s}" + "".join(f"{s:>10d}" for s in budgets))
for label in samplers:
    print(f"{label:16s}" + "".join(f"{results[label, s][1]:10.2e}" for s in budgets))""",
    """fig, ax = plt.subplots(figsize=(5.5, 4))
for label in samplers:
    pts = sorted((results[label, s][0], results[label, s][1]) for s in budgets)
    ax.loglog(*zip(*pts), "o-", label=label, ms=3)
ax.axhspan(float(floors.min()), float(floors.max()), color="0.85", label="two exact sets (range)")
ax.axhline(float(floors.mean()), color="k", ls=":", lw=0.8)
ax.set_xlabel("model evaluations (NFE)")
ax.set_ylabel(f"sliced W2^2 to exact samples (mean of {repeats})")
ax.set_title("eight Gaussians, exact eps, from the exact p_T")
ax.legend(fontsize=7)
fig.tight_layout()
save(fig, "samplers_error_vs_nfe.png")""",
    """md:Once a curve is inside the grey band its error is below what n samples can resolve: sample distances
rank samplers only at small budgets. The exact KL on a Gaussian (below) keeps separating them.""",
    """md:## Stochastic and deterministic: the same x_T through ancestral and DDIM
Ancestral steps add noise (the paths wander); DDIM follows the probability-flow ODE's discretisation.""",
    """fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
for ax, (label, opts) in zip(axes, [("ancestral", {}), ("DDIM", {"eta": 0.0})]):
    path = []
    sd.sample(ring.model(sde), sde, sampler="ancestral", steps=50, x_T=x_Ts[0][:24], callback=lambda i: path.append(i["x"]),
              generator=torch.Generator().manual_seed(4), **opts)
    p = torch.stack(path).numpy()
    for j in range(p.shape[1]):
        ax.plot(p[:, j, 0], p[:, j, 1], lw=0.6, alpha=0.7)
    ax.set_title(label)
    ax.set_aspect("equal")
fig.tight_layout()""",
    """md:## Exact KL on a Gaussian: deterministic samplers are affine maps of x_T""",
    """gauss = sd.oracle.random_gaussian(d=8)
alpha, sigma = (float(v) for v in sde.marginal(1.0))
m_T, S_T = alpha * gauss.mean, alpha**2 * gauss.cov + sigma**2 * torch.eye(8, dtype=torch.float64)
print(f"{'sampler':14s}" + "".join(f"{s:>11d}" for s in budgets))
for name, opts in {"ddim": ("ancestral", {"eta": 0.0}), "pf_ode": ("pf_ode", {}), "dpm_solver": ("dpm_solver", {})}.items():
    row = []
    for steps in budgets:
        basis = torch.cat([torch.zeros(1, 8), torch.eye(8)]).double()
        y = sd.sample(gauss.model(sde), sde, sampler=opts[0], steps=steps, x_T=basis, **opts[1])
        b, A = y[0], (y[1:] - y[0]).T
        row.append(f"{gaussian_kl(A @ m_T + b, A @ S_T @ A.T, gauss.mean, gauss.cov):11.2e}")
    print(f"{name:14s}" + "".join(row))""",
    """md:## Stochastic samplers, scored exactly too

On Gaussian data a *stochastic* sampler is an affine map of x_T **and of its noise draws**, so its output is
exactly Gaussian as well. `sdediff.samplers.sampler_law` runs the sampler's own code on basis starts and on
basis noise columns (its `noise` option) and returns that law: the KL below is exact, with no sampling noise,
for DPM-Solver++ SDE, EDM's stochastic Heun (churn), Euler-ancestral and DPM-Solver++(2S) ancestral. Every
sampler starts from the exact p_T and ends at sigma = 0 (k-diffusion's convention); `dpm_solver` is there for
reference. `benchmarks/stochastic.py` compares them with k-diffusion's own functions.""",
    """from sdediff.samplers import sampler_law

stoch = {
    "dpm_solver_sde (default)": ("dpm_solver_sde", {}),
    "dpm_solver_sde 2M, eta 1": ("dpm_solver_sde", {"order": 2, "eta": 1.0, "solver_type": "midpoint"}),
    "edm, churn 10": ("edm", {"churn": 10.0, "grid": "uniform", "t_min": 0.0}),
    "euler_ancestral": ("euler_ancestral", {"grid": "uniform"}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {"grid": "uniform", "t_min": 0.0}),
    "dpm_solver (ODE)": ("dpm_solver", {}),
}
nfes = [10, 20, 50] if QUICK else [10, 15, 20, 30, 50, 100]
kl = {}
for label, (name, opts) in stoch.items():
    for nfe in nfes:
        steps = (nfe + 1) // 2 if name in ("edm", "dpmpp_2s_ancestral") else nfe
        law = sampler_law(gauss.model(sde), sde, m_T, S_T, sampler=name, steps=steps, **opts)
        kl[label, nfe] = (law.nfe, law.kl(gauss.mean, gauss.cov))
print(f"{'sampler':26s}" + "".join(f"{n:>10d}" for n in nfes))
for label in stoch:
    print(f"{label:26s}" + "".join(f"{kl[label, n][1]:10.2e}" for n in nfes))""",
    """fig, ax = plt.subplots(figsize=(5.5, 4))
for label in stoch:
    pts = [kl[label, n] for n in nfes]
    ax.loglog(*zip(*pts), marker="o", ms=3, label=label, ls="--" if "ODE" in label else "-")
ax.set_xlabel("model evaluations (NFE)")
ax.set_ylabel("exact KL(output law || data) [nats]")
ax.set_title("8-D Gaussian, exact eps, from the exact p_T")
ax.legend(fontsize=7)
fig.tight_layout()
save(fig, "stochastic_kl_vs_nfe.png")""",
    """md:## A trained toy model: error against a tight solve, and wall time""",
    """import time

from sdediff.losses import DiffusionLoss

torch.manual_seed(0)
model = sd.Model(sd.nets.MLP(2, hidden=128, depth=3, emb_dim=64), "eps")
res = sd.train.train(model, DiffusionLoss(sde), sd.data.toy2d_dataset("eight_gaussians", 20000), steps=300 if QUICK else 3000,
                     batch_size=256, lr=4e-3, warmup=100, lr_decay="cosine", progress=False, tensorboard=False)
net = res.eval_model.eval()
x_T = sde.prior_sample((1000, 2), generator=torch.Generator().manual_seed(0))
tight = sd.sample(net, sde, sampler="torchdiffeq", steps=1, x_T=x_T, rtol=1e-7, atol=1e-7, grid="uniform")
for name in ("pf_ode", "dpm_solver"):
    for steps in budgets:
        t0 = time.perf_counter()
        x, info = sd.sample(net, sde, sampler=name, steps=steps, x_T=x_T, t_min=1e-3, return_info=True)
        wall = time.perf_counter() - t0
        print(f"{name:11s} {steps:4d} steps {info.nfe:4d} NFE  RMS to tight solve {float((x - tight).pow(2).mean().sqrt()):.2e}  {wall * 1e3:6.1f} ms")""",
]

LIKELIHOOD = [
    """md:# Three likelihoods of one model

The probability-flow ODE gives an exact log-density; DDPM's discrete VLB and the continuous (VDM) ELBO give
bounds. On exact ground truth all three can be checked; `sdediff-likelihood` prints them side by side for any
trained run. Then: Hutchinson's trace estimator against its number of probes, and the bits/dim convention.""",
    HEAD,
    """from sdediff.likelihood import bits_per_dim, continuous_elbo, discrete_vlb, log_likelihood

data = sd.oracle.ring_mixture()
sde = sd.SDE(sd.DiscreteVP.ddpm(1000))
x = data.sample(200 if QUICK else 1000, generator=torch.Generator().manual_seed(0))
exact = -data.log_prob(x, 1e-5, sde)
pf = log_likelihood(data.model(sde), sde, x, trace="exact", prior_log_prob=lambda z: data.log_prob(z, 1.0, sde))
vlb = {v: discrete_vlb(data.model(sde), sde, x, decoder="gaussian", variance=v, n_t=64 if QUICK else None,
                      generator=torch.Generator().manual_seed(1)) for v in ("small", "large")}
elbo = continuous_elbo(data.model(sde), sde, x, generator=torch.Generator().manual_seed(2))
rows = [("exact -log p", exact), ("PF-ODE", -pf.logp), ("discrete VLB, beta_tilde", vlb["small"].nats),
        ("discrete VLB, beta", vlb["large"].nats), ("continuous ELBO", elbo.nelbo)]
for name, v in rows:
    gap = v - exact
    print(f"{name:26s} {float(v.mean()):8.4f} nats per point   gap to exact {float(gap.mean()):+.4f}"
          f" ± {float(gap.std() / math.sqrt(len(gap))):.4f}")""",
    """md:The PF-ODE matches the exact density to the solver tolerance, and the continuous ELBO sits just above
it. The discrete VLB depends on the reverse variance: with the exact posterior means, DDPM's "small"
variance beta_tilde_t is too small for the first steps (the true reverse kernel is wider when x_0 is not
yet pinned down), and those steps alone cost about half a nat per dimension; with beta_t ("large") the
bound on this data is tight within its standard error. Learned or analytic variances close that gap for
trained models.""",
    """fig, ax = plt.subplots(figsize=(4.6, 4.2))
ax.scatter(exact, elbo.nelbo, s=4, alpha=0.5, label="continuous ELBO")
ax.scatter(exact, -pf.logp, s=4, alpha=0.5, label="PF-ODE")
lo, hi = float(exact.min()), float(exact.max())
ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
ax.set_xlabel("exact -log p (nats)")
ax.set_ylabel("estimate (nats)")
ax.legend(fontsize=8)
fig.tight_layout()""",
    """md:## Hutchinson: the standard error falls like 1/sqrt(K)""",
    """gauss = sd.oracle.random_gaussian(d=16)
cont = sd.SDE(sd.LinearVP())
xg = gauss.sample(128 if QUICK else 512, generator=torch.Generator().manual_seed(3))
truth = gauss.log_prob(xg, 1e-5, cont)
ks = [1, 2, 4] if QUICK else [1, 2, 4, 8, 16]
errs, ses = [], []
for k in ks:
    r = log_likelihood(gauss.model(cont), cont, xg, trace="hutchinson", probes=k, rtol=1e-4, atol=1e-4,
                       generator=torch.Generator().manual_seed(4), prior_log_prob=lambda z: gauss.log_prob(z, 1.0, cont))
    errs.append(float((r.logp - truth).pow(2).mean().sqrt()))
    ses.append(float(r.stderr.pow(2).mean().sqrt()))
fig, ax = plt.subplots(figsize=(5, 3.8))
ax.loglog(ks, errs, "o-", label="RMS error to the exact log p")
ax.loglog(ks, ses, "s--", label="reported standard error")
ax.loglog(ks, [errs[0] / math.sqrt(k) for k in ks], "k:", label="1/sqrt(K)")
ax.set_xlabel("probes K")
ax.set_ylabel("nats per point")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "hutchinson_probes.png")""",
    """md:## The bits/dim convention: a uniform density on [-1, 1]^D is exactly 8 bits/dim""",
    """k = torch.randint(0, 256, (64, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
D = 3 * 4 * 4
uniform = lambda x: torch.full((x.shape[0],), -D * math.log(2.0), dtype=torch.float64)  # noqa: E731
print("bits/dim of the uniform density:", bits_per_dim(None, None, k, log_density=uniform).mean)""",
]

OBJECTIVES = [
    """md:# Objectives: the seeds' weights, L_simple and the Kingma-Gao family

Every objective in `sdediff.losses` is a weighting of the same eps-regression error (Kingma & Gao 2023). Here:
the discrete VLB's exact KL weights from DDPM's bound against L_simple's flat weight, the family of weightings
`w(lambda)` over log-SNR, and what three of them do to a toy model's likelihood.""",
    HEAD,
    """from sdediff.losses import EDM, ELBO, IDDPM, VMSE, X0MSE, DiffusionLoss, Sigmoid, Simple, VLBLoss

sch = sd.DiscreteVP.ddpm(1000)
vlb = VLBLoss(sd.SDE(sch))
t = sch.timesteps[1:]
fig, ax = plt.subplots(figsize=(5, 3.6))
ax.semilogy(t, vlb.eps_weight(t), label="VLB: beta^2 / (2 sigma^2 alpha (1 - abar))")
ax.semilogy(t, torch.ones_like(t), label="L_simple: 1")
ax.set_xlabel("t = i / N")
ax.set_ylabel("weight of ||eps - eps_hat||^2")
ax.legend(fontsize=8)
fig.tight_layout()""",
    """lam = torch.linspace(-10, 10, 401, dtype=torch.float64)
cont = sd.LinearVP()
fig, ax = plt.subplots(figsize=(6, 4))
for w in (ELBO(), Sigmoid(bias=-2.0), EDM(), IDDPM(), VMSE(), X0MSE()):
    ax.semilogy(lam, w.w(lam), label=repr(w))
tl = cont.t_from_log_snr(lam)
ax.semilogy(lam, 2 / -cont.dlog_snr_dt(tl), "k--", label="Simple (LinearVP): 2 / (-lambda')")
ax.set_xlabel("log-SNR lambda")
ax.set_ylabel("w(lambda)")
ax.set_ylim(1e-4, 1e3)
ax.legend(fontsize=7)
fig.tight_layout()
save(fig, "weightings.png")""",
    """md:## Their effect on a toy model: test NLL through the PF-ODE""",
    """from sdediff.losses import LogSNRUniform
from sdediff.likelihood import log_likelihood

sde = sd.SDE(sd.LinearVP())
train_x = sd.data.toy2d_dataset("eight_gaussians", 20000)
test_x = sd.data.toy2d("eight_gaussians", 500, seed=1)
for name, loss in {
    "Simple, uniform t": DiffusionLoss(sde, Simple()),
    "ELBO, uniform log-SNR": DiffusionLoss(sde, ELBO(), LogSNRUniform(), t_min=1e-4),
    "Sigmoid(-2), uniform log-SNR": DiffusionLoss(sde, Sigmoid(-2.0), LogSNRUniform(), t_min=1e-4),
}.items():
    torch.manual_seed(0)
    model = sd.Model(sd.nets.MLP(2, hidden=128, depth=3, emb_dim=64), "eps")
    res = sd.train.train(model, loss, train_x, steps=200 if QUICK else 3000, batch_size=256, lr=4e-3, warmup=100,
                         lr_decay="cosine", progress=False, tensorboard=False)
    ll = log_likelihood(res.eval_model.eval(), sde, test_x, rtol=1e-3 if QUICK else 1e-5, atol=1e-3 if QUICK else 1e-5)
    print(f"{name:30s} test NLL {float(-ll.logp.mean()):.3f} ± {float(ll.logp.std() / math.sqrt(len(test_x))):.3f} nats")""",
]

import sys  # noqa: E402

sys.path.insert(0, str(HERE))
from _image_models import IMAGE_MODELS  # noqa: E402 (notebook 05's cells live in their own file)
GUIDANCE = [
    """md:# Classifier-free guidance on eight Gaussians: the trade-off, exactly

Eight 2-D Gaussians, one class per mode (`sdediff.oracle.labelled_ring`): the exact conditional and
unconditional scores are known, hence the exact guided prediction and the exact class posterior. A small
conditional MLP is trained with label dropout (`p_uncond = 0.1`), then sampled with `sd.guided` at several
scales, with and without the guidance interval; the class accuracy (by the exact posterior), the diversity
(within-class variance relative to the data's) and the Fréchet distance to exact draws are measured for
the trained net and for the exact model guided the same way.""",
    HEAD,
    """import io

from IPython.display import Image, display

from sdediff.oracle import labelled_ring
from sdediff.training import train


def show(fig):
    \"\"\"Store the figure in the notebook as a PNG output.\"\"\"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


gm = labelled_ring(8)
sde = sd.SDE(sd.LinearVP())
data = sd.data.labelled_mixture_dataset(gm, 20000, seed=0)
torch.manual_seed(0)
net = sd.MLP(2, hidden=64, depth=2, emb_dim=32, num_classes=8)
res = train(sd.Model(net), sd.losses.DiffusionLoss(sde), data, steps=300 if QUICK else 3000,
            batch_size=256, lr=4e-3, warmup=100, lr_decay="cosine", p_uncond=0.1, progress=False,
            tensorboard=False)
model = res.eval_model.eval()
print(f"trained {len(res.losses)} steps in {res.elapsed_s:.0f} s; class prior {net.class_embed.class_prior.tolist()}")""",
    """md:## Guided samples, one colour per class""",
    """per = 50 if QUICK else 250
labels = torch.arange(8).repeat_interleave(per)
test_x, test_y = gm.sample_labelled(len(labels), torch.Generator().manual_seed(1))


def draw(m, scale, interval=None):
    g = torch.Generator().manual_seed(0)
    return sd.sample(sd.guided(m, labels, scale, interval), sde, steps=20, shape=(len(labels), 2), generator=g)


def fd(a, b):
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sa = (v * w.clamp(min=0).sqrt()) @ v.T
    w2, v2 = torch.linalg.eigh(sa @ cb @ sa)
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + ca.trace() + cb.trace() - 2 * w2.clamp(min=0).sqrt().sum())


def measure(x):
    x = x.double()
    acc = float((gm.log_posterior(x, 1e-3, sde).argmax(1) == labels).double().mean())
    div = sum(float(x[labels == c].var(0).sum() / test_x[test_y == c].var(0).sum()) for c in range(8)) / 8
    return acc, div, fd(x, test_x)


scales = [0.0, 1.0, 1.5, 2.0, 3.0, 4.0]
exact = sd.Model(gm.model(sde))
fig, axes = plt.subplots(2, len(scales), figsize=(2.6 * len(scales), 5.4))
for j, w in enumerate(scales):
    for i, (name, m) in enumerate((("trained", model), ("exact", exact))):
        x = draw(m, w)
        ax = axes[i, j]
        ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="tab10", s=1.5, vmin=0, vmax=9)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}, scale {w:g}", fontsize=9)
fig.tight_layout()
show(fig)""",
    """md:## The trade-off curve
Accuracy rises with the scale while the samples contract towards the modes (diversity below 1); the
interval variant guides only where sigma/alpha is in (0.28, 2.9]. Dotted: the exact model guided the same
way; the FD floor is that of two exact sample sets of this size.""",
    """interval = (0.28, 2.9)
other, _ = gm.sample_labelled(len(labels), torch.Generator().manual_seed(2))
floor = fd(other, test_x)
rows = {}
for name, m in (("trained", model), ("exact", exact)):
    for iv in (None, interval):
        key = f"{name}{', interval' if iv else ''}"
        rows[key] = [measure(draw(m, w, iv)) for w in scales]
for key, vals in rows.items():
    print(key.ljust(18), " ".join(f"{w:g}: acc {a:.3f} div {d:.2f} FD {f:.3f} |" for w, (a, d, f) in zip(scales, vals)))
print(f"FD floor (two exact sets): {floor:.4f}")
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for key, vals in rows.items():
    style = ":" if key.startswith("exact") else "-"
    for ax, k in zip(axes, range(3)):
        ax.plot(scales, [v[k] for v in vals], style, marker="o", ms=3, label=key)
axes[2].axhline(floor, color="k", lw=0.8, ls="--", label="FD floor")
axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
axes[1].set_yscale("log")
titles = ["class accuracy (exact posterior)", "diversity: within-class variance / data's (1 = data)",
          "FD to exact draws"]
for ax, name in zip(axes, titles):
    ax.set_xlabel("guidance scale")
    ax.set_title(name)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
axes[2].set_yscale("log")
fig.tight_layout()
save(fig, "guidance_tradeoff.png")
show(fig)""",
]

BOOKS = {
    "01_ddpm_vs_vpsde.ipynb": DDPM,
    "02_comparing_samplers.ipynb": SAMPLERS,
    "03_likelihood.ipynb": LIKELIHOOD,
    "04_objectives.ipynb": OBJECTIVES,
    "05_image_models.ipynb": [IMAGE_MODELS[0], HEAD, *IMAGE_MODELS[1:]],
    "06_guidance.ipynb": GUIDANCE,
}


def image_outputs(nb) -> int:
    """How many image outputs (``image/png``) the notebook's code cells hold."""
    return sum(
        "image/png" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )


if __name__ == "__main__":
    from nbclient import NotebookClient

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name, cells in BOOKS.items():
        if sys.argv[1:] and not any(name.startswith(a) for a in sys.argv[1:]):
            continue
        nb = notebook(cells)
        NotebookClient(
            nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        ).execute()
        if not image_outputs(nb):
            raise SystemExit(f"{name}: no image output stored; is every figure drawn in a code cell?")
        nbf.write(nb, HERE / name)
        print("wrote", HERE / name, f"({image_outputs(nb)} images)")
