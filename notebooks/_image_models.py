"""Cells of notebooks/05_image_models.ipynb (built by notebooks/_build.py, which inserts its HEAD cell after
the title)."""

IMAGE_MODELS = [
    """md:# Image models: a digits U-Net judged by FD, KID and bits/dim

The field judges image models and samplers by a Fréchet distance in a feature space against the number of model
evaluations (NFE). Without downloadable Inception weights, `sdediff.metrics.Features` trains a small classifier on
the data set and uses its penultimate layer, as FID uses Inception's pool3. Every FD is shown beside its **floor**:
the same metric between the test split and as many held-out *real* images (FD is biased upwards by O(d/n), so a
model can only be judged against what real data of the same size reaches).

This notebook trains a small U-Net on scikit-learn's 8x8 digits (quick mode: a tiny one for a few hundred steps;
the recorded 30-minute run is `sdediff-train experiment=digits_unet`, see `benchmarks/results/digits_unet.md`),
compares samplers by FD vs NFE with the floor band, shows a sample grid per sampler, and scores the test split in
bits/dim three ways.""",
    """md:## Data, the feature classifier and the floor""",
    """from sdediff.data import digits
from sdediff.metrics import Features, fd, kid, precision_recall

train, val, test = digits("train"), digits("val"), digits("test")
test_x, val_x, train_x = test.tensor(), val.tensor(), train.tensor()
n = len(test_x)  # 200: every FD below compares n images with the n test images
feats = Features.fit(train, test, steps=300 if QUICK else 1500, width=16 if QUICK else 32, progress=False)
print(f"classifier: test accuracy {feats.test_accuracy:.3f}, {feats.feature_dim} features")

# the floor band: FD of real images (the validation split, and random training subsets) to the test split
g = torch.Generator().manual_seed(0)
floors = [fd(val_x, test_x, feats)] + [
    fd(train_x[torch.randperm(len(train_x), generator=g)[:n]], test_x, feats) for _ in range(4 if QUICK else 8)
]
floor_lo, floor_hi = min(floors), max(floors)
k = kid(val_x, test_x, feats)
print(f"floor: FD {floors[0]:.3f} (validation vs test), {floor_lo:.3f}..{floor_hi:.3f} over real sets; "
      f"KID {k.mean:.4f} ± {k.stderr:.4f}")""",
    """md:## A small U-Net trained on dequantized digits (continuous ELBO, log-SNR importance sampling)""",
    """from sdediff.losses import ELBO, DiffusionLoss, LogSNRUniform

sde = sd.SDE(sd.LinearVP())
torch.manual_seed(0)
net = sd.nets.UNet(in_ch=1, ch=8 if QUICK else 16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                   dropout=0.1, resolution=8, time_input="log_snr", schedule=sde.schedule)
model = sd.Model(net, "eps")
loss = DiffusionLoss(sde, ELBO(), LogSNRUniform(), t_min=1e-5)
res = sd.train.train(model, loss, train, steps=200 if QUICK else 1500, batch_size=128, lr=2e-3, warmup=100,
                     lr_decay="cosine", ema_decay=0.999, dequantize=True, progress=False, tensorboard=False)
model = res.eval_model.eval()
print(f"{sum(p.numel() for p in net.parameters()):,} parameters, {res.step} steps in {res.elapsed_s:.0f} s")""",
    """md:## Samplers by FD vs NFE, with the floor band""",
    """samplers = ["ancestral", "euler_maruyama", "dpm_solver"]
budgets = [5, 10, 20] if QUICK else [5, 10, 20, 50, 100]
x_T = sde.prior_sample((n, 1, 8, 8), generator=torch.Generator().manual_seed(1))
rows, last = [], {}
for name in samplers:
    for steps in budgets:
        x, info = sd.sample(model, sde, sampler=name, steps=steps, x_T=x_T, return_info=True,
                            generator=torch.Generator().manual_seed(2))
        x = x.clamp(-1, 1)
        k = kid(x, test_x, feats)
        rows.append((name, steps, info.nfe, fd(x, test_x, feats), k.mean, k.stderr))
        last[name] = x
print(f"{'sampler':<16}{'steps':>6}{'NFE':>6}{'FD':>10}{'KID':>10}{'± s.e.':>9}")
for r in rows:
    print(f"{r[0]:<16}{r[1]:>6}{r[2]:>6}{r[3]:>10.3f}{r[4]:>10.4f}{r[5]:>9.4f}")

fig, ax = plt.subplots(figsize=(6, 4))
for name in samplers:
    pts = [(r[2], r[3]) for r in rows if r[0] == name]
    ax.loglog(*zip(*pts), "o-", ms=3, label=name)
ax.axhspan(floor_lo, floor_hi, color="k", alpha=0.12, label="floor: real images vs test")
ax.set_xlabel("model evaluations (NFE)")
ax.set_ylabel("FD to the test split (classifier features)")
ax.set_title(f"digits U-Net, n = {n}")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "image_models_fd_vs_nfe.png")""",
    """md:## A sample grid per sampler (at the largest budget), next to real test digits""",
    """from sdediff.cli._report import image_grid

panels = [("test data", test_x[:64])] + [(f"{s}, {budgets[-1]} steps", last[s][:64]) for s in samplers]
fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
for ax, (title, imgs) in zip(axes, panels):
    ax.imshow(image_grid(imgs)[..., 0], cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
pr = precision_recall(last["dpm_solver"], test_x, feats)
print(f"dpm_solver, {budgets[-1]} steps: precision {pr.precision:.2f}, recall {pr.recall:.2f} (k = {pr.k})")""",
    """md:## Bits/dim three ways

The PF-ODE likelihood with the exact divergence (64 dimensions: affordable), the same with Hutchinson's estimate
(what images of realistic size need), and the continuous-time ELBO bound with a discretized decoder. The ELBO is an
upper bound on the model's -log P; the PF-ODE is a different model (the deterministic flow of the same network),
usually a little better. The best Gaussian mixture (chosen on validation) is the classical baseline.""",
    """from sdediff.cli._report import gmm_bits_per_dim
from sdediff.likelihood import bits_per_dim, continuous_elbo

m = 50 if QUICK else 100
xt = test_x[:m]
tol = dict(rtol=1e-3, atol=1e-3) if QUICK else dict(rtol=1e-5, atol=1e-5)
g = torch.Generator().manual_seed(3)
exact = bits_per_dim(model, sde, xt, trace="exact", generator=g, t_eps=1e-5, **tol)
hutch = bits_per_dim(model, sde, xt, trace="hutchinson", probes=2, generator=g, t_eps=1e-5, **tol)
elbo = continuous_elbo(model, sde, xt, decoder="discretized", generator=g, n_t=32 if QUICK else 128)
elbo_bpd = elbo.bpd.double()
gmm = gmm_bits_per_dim(train_x, val_x, xt, components=(1, 4, 16) if QUICK else (1, 2, 4, 8, 16, 32), log=lambda s: None)
table = {
    "PF-ODE, exact divergence": (exact.mean, exact.mean_stderr),
    "PF-ODE, Hutchinson (2 probes)": (hutch.mean, hutch.mean_stderr),
    "continuous -ELBO (bound)": (float(elbo_bpd.mean()), float(elbo_bpd.std() / math.sqrt(m))),
    f"best GMM ({gmm['covariance_type']}, {gmm['components']})": (gmm["bpd"], gmm["bpd_stderr"]),
}
for k_, (v, se) in table.items():
    print(f"{k_:<34} {v:.3f} ± {se:.3f} bits/dim ({m} test digits)")""",
]
