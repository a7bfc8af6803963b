"""Networks: shapes, gradients, parameter count of the paper-size U-Net, time embedding, dtypes, seeds."""

from __future__ import annotations

import pytest
import torch

from sdediff import SDE, DiscreteVP, LinearVP, Model
from sdediff.losses import DiffusionLoss, Simple, Uniform
from sdediff.nets import MLP, TimeEmbedding, UNet, sinusoidal_embedding

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, dropout=0.0)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_mlp_shapes_and_gradients():
    torch.manual_seed(0)
    net = MLP(3, hidden=32, depth=2, emb_dim=16)
    x, t = torch.randn(5, 3), torch.rand(5)
    y = net(x, t)
    assert y.shape == (5, 3) and y.dtype == torch.float32
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net(x, 0.5).shape == (5, 3)  # a scalar time is broadcast
    with pytest.raises(ValueError, match="features"):
        net(torch.randn(5, 4), t)


def test_tiny_unet_forward_backward():
    torch.manual_seed(0)
    net = UNet(**TINY, zero_init=False)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    y = net(x, t)
    assert y.shape == x.shape
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    # other sizes, output channels, heads and FiLM conditioning
    net2 = UNet(
        in_ch=1, out_ch=2, ch=16, ch_mult=(1, 2, 2), attn_resolutions=(8,), resolution=16,
        num_heads=2, scale_shift=True, num_res_blocks=1,
    )  # fmt: skip
    assert net2(torch.randn(3, 1, 16, 16), torch.rand(3)).shape == (3, 2, 16, 16)
    assert net2(torch.randn(1, 1, 8, 24), torch.rand(1)).shape == (1, 2, 8, 24)  # fully convolutional


def test_zero_init_gives_zero_output_like_ddpmpp():
    net = UNet(**TINY)  # zero_init=True (DDPM++'s init_scale=0)
    assert torch.count_nonzero(net(torch.randn(2, 3, 8, 8), torch.rand(2))) == 0


def test_paper_size_unet_parameter_count():
    """DDPM's CIFAR-10 U-Net (ch 128, 1,2,2,2, 2 res blocks, attention at 16) has 35.7M parameters
    (Ho et al. 2020, App. B); ours adds nothing to that layer list (DDPM++'s 1/sqrt(2) skips and
    initialisation are parameter-free), so the count must be 35.75M to within a few thousand."""
    n = n_params(UNet())  # constructed once on CPU, never run
    assert 35.6e6 < n < 35.9e6, n


def test_bad_unet_configurations():
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(**{**TINY, "attn_resolutions": (5,)})
    with pytest.raises(ValueError, match="divisible"):
        UNet(**{**TINY, "resolution": 9})
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 7, 8), torch.rand(1))


def test_time_embedding_distinguishes_nearby_times():
    """Continuous t: times 1e-3 apart (one DDPM step) give clearly different embeddings, the map is
    smooth (1e-6 apart gives a small change) and the log-SNR mode is finite even at t = 0."""
    emb = TimeEmbedding(64, mlp=False)  # the fixed sinusoidal part, time_scale 1000
    t = torch.linspace(0, 1, 1001)
    e = emb(t)
    gaps = (e[1:] - e[:-1]).norm(dim=1)
    assert float(gaps.min()) > 0.5  # 1e-3 apart: a step of 1 in the feature 1000 t
    small = (emb(t + 1e-6) - e).norm(dim=1)
    assert float(small.max()) < 0.01
    # distinct even between times much closer than the DDPM grid
    assert float((emb(torch.tensor([0.5])) - emb(torch.tensor([0.5001]))).norm()) > 0.05
    lsnr = TimeEmbedding(64, time_input="log_snr", schedule=LinearVP(), mlp=False)
    z = lsnr(torch.tensor([0.0, 1e-3, 1e-3 + 1e-5, 1.0]))
    assert torch.isfinite(z).all()
    assert float((z[1] - z[2]).norm()) > 1e-3
    # the grid of a 1000-step DiscreteVP appears as DDPM's integer steps 1..1000
    torch.testing.assert_close(
        emb.features(DiscreteVP.ddpm(1000).timesteps.float()), torch.arange(1.0, 1001.0)
    )
    torch.testing.assert_close(sinusoidal_embedding(torch.zeros(2), 8)[:, :4], torch.ones(2, 4))


def test_log_snr_input_and_time_transform():
    torch.manual_seed(0)
    sched = LinearVP()
    net = MLP(2, hidden=16, depth=1, emb_dim=8, time_input="log_snr", schedule=sched)
    x = torch.randn(4, 2)
    y = net(x, torch.tensor([0.0, 0.3, 0.7, 1.0]))
    assert torch.isfinite(y).all()
    f = TimeEmbedding(8, time_transform=lambda t: 1000 * t - 1, mlp=False).features(
        torch.tensor([0.001, 1.0])
    )
    torch.testing.assert_close(f, torch.tensor([0.0, 999.0]))
    with pytest.raises(ValueError, match="schedule"):
        MLP(2, time_input="log_snr")
    with pytest.raises(ValueError, match="time_input must be one of"):
        MLP(2, time_input="sigma")


def test_dtypes_and_channels_last():
    torch.manual_seed(0)
    net = UNet(**TINY, zero_init=False).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ref = net(x, t)
    # channels_last input and weights: same numbers, layout-independent
    net_cl = UNet(**TINY, zero_init=False).eval()
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last), t), ref, rtol=1e-4, atol=1e-5)
    # bf16 autocast (CPU here; the same code path on CUDA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, t)
    assert torch.isfinite(y).all() and (y.float() - ref).abs().max() < 0.1 * ref.abs().max()
    # a bf16 network on bf16 input; float64 network on float64 input
    y16 = UNet(**TINY, zero_init=False).to(torch.bfloat16)(x.bfloat16(), t)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    net64 = MLP(2, hidden=16, depth=1, emb_dim=8).double()
    assert (
        net64(torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)).dtype
        == torch.float64
    )
    # through the Model wrapper, which hands the net float32 times for bf16 states
    m = Model(MLP(2, hidden=16, depth=1, emb_dim=8).to(torch.bfloat16), "eps")
    assert m(torch.randn(3, 2, dtype=torch.bfloat16), 0.3).dtype == torch.bfloat16


def test_determinism_with_a_seed():
    def build_and_run():
        torch.manual_seed(123)
        net = UNet(**{**TINY, "dropout": 0.1}, zero_init=False)
        g = torch.Generator().manual_seed(7)
        x, t = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g)
        torch.manual_seed(9)  # dropout draws
        return net.train()(x, t), net.eval()(x, t)

    (a_train, a_eval), (b_train, b_eval) = build_and_run(), build_and_run()
    assert torch.equal(a_train, b_train) and torch.equal(a_eval, b_eval)
    assert not torch.equal(a_train, a_eval)  # dropout is active in training mode


def test_mlp_learns_a_toy_problem_with_the_loss():
    """A few Adam steps of L_simple on 2-D Gaussian data reduce the loss from ~1 (predicting 0) markedly."""
    torch.manual_seed(0)
    sde = SDE(LinearVP())
    net = MLP(2, hidden=64, depth=2, emb_dim=32, zero_init=True)
    model = Model(net, "eps")
    loss = DiffusionLoss(sde, weighting=Simple(), time_sampler=Uniform())
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.05, 0.05])
    hist = []
    for _ in range(100):
        x0 = torch.randn(128, 2, generator=g) * scale + torch.tensor([0.5, -0.5])
        v = loss(model, x0, generator=g).mean()
        opt.zero_grad()
        v.backward()
        opt.step()
        hist.append(float(v.detach()))
    assert hist[0] > 0.9 and sum(hist[-20:]) / 20 < 0.5 * hist[0], hist
