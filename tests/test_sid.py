"""SiD / SiDA against hand computations on a tiny random teacher (CPU, seconds)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onestep.denoiser import raw_network
from training.methods.common import edm_weight, karras_sigma_at
from training.methods.sid import SiD, SiDConfig

LABELS = torch.tensor([1, 7, 3])


def _toy_data(n=64, value=220):
    """Real images that clearly differ from what the tiny random generator makes: near-constant bright images."""
    from onestep.data import ImageSet

    rng = np.random.default_rng(0)
    images = np.clip(value + rng.normal(0, 8, size=(n, 1, 32, 32)), 0, 255).astype(np.uint8)
    return ImageSet(images=images, labels=rng.integers(0, 10, n).astype(np.int64), num_classes=10, name="toy")


def _method(teacher, **kw):
    cfg = SiDConfig(**kw)
    return SiD(cfg, teacher, _toy_data() if cfg.adversarial else None)


def _perturb(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


class _Encoder:
    """Our own hook on the fake score's encoder output (the last down block), independent of the method's."""

    def __init__(self, fake):
        self.out = None
        raw_network(fake).down_blocks[-1].register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self.out = output[0] if isinstance(output, tuple) else output

    def logits(self):
        return self.out.float().mean(1).flatten(1)


def _replay_generator_step(m, seed, enc=None):
    """The generator step's random draws (z, t, noise) replayed by hand; returns the pieces of the loss."""
    torch.manual_seed(seed)
    z = torch.randn(len(LABELS), 1, 32, 32)
    x_g = m.trainable["generator"](z, LABELS)
    sigma = karras_sigma_at(torch.rand(len(LABELS)) * 0.8, 0.002, 80.0)
    x_t = x_g + torch.randn_like(x_g) * sigma.reshape(-1, 1, 1, 1)
    f_phi, f_psi = m.teacher(x_t, sigma, LABELS), m.trainable["fake"](x_t, sigma, LABELS)
    logits = enc.logits() if enc is not None else None
    return x_g, f_phi, f_psi, logits


def _hand_sid(x_g, f_phi, f_psi, alpha, scale):
    """SiD Eq. 14: sum_pixels (f_phi - f_psi) ((f_phi - x_g) - alpha (f_phi - f_psi)) / scale, batch mean."""
    return ((f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi)) / scale).sum((1, 2, 3)).mean()


def _hand_gan(x_g, logits, scale):
    """SiDA: batch-mean BCE(clamp(logits), 1) / scale_i * pixels, batch mean, weight 0.01 / 100."""
    bce = F.softplus(-logits.clamp(-10, 10)).mean()
    return 0.01 / 100 * (bce / scale.flatten()).mean() * x_g[0].numel()


def _descends(m, it, hand_loss, seed=3):
    """One small SGD step on the generator along the implementation's gradient lowers the hand-written loss
    (same random draws, the stop-gradient scale frozen at its value before the step)."""
    G = m.trainable["generator"]
    m.trainable["fake"].requires_grad_(False)
    torch.manual_seed(seed)
    G.zero_grad()
    m.step({"n": len(LABELS), "labels": LABELS}, it=it, phase="generator")["loss"].backward()
    grads = [p.grad.clone() for p in G.parameters()]
    with torch.no_grad():
        l0, scale = hand_loss(None)
        gnorm2 = sum(float((g**2).sum()) for g in grads)
        assert gnorm2 > 0
        lr = 1e-3 * abs(float(l0)) / gnorm2  # first-order decrease: 0.1% of |loss|
        for p, g in zip(G.parameters(), grads):
            p.sub_(lr * g)
        l1, _ = hand_loss(scale)
    assert float(l1) < float(l0), (float(l0), float(l1))


@pytest.mark.parametrize("alpha", [1.2, 0.5])
def test_sid_generator_loss_by_hand_with_a_perturbed_fake_score(tiny_denoiser, alpha):
    m = _method(tiny_denoiser, alpha=alpha)
    _perturb(m.trainable["fake"])  # fake != teacher, else the loss is exactly 0
    torch.manual_seed(3)
    out = m.step({"n": len(LABELS), "labels": LABELS}, it=0, phase="generator")
    with torch.no_grad():
        x_g, f_phi, f_psi, _ = _replay_generator_step(m, 3)
        scale = (x_g - f_phi).abs().mean((1, 2, 3), keepdim=True)
        ref = _hand_sid(x_g, f_phi, f_psi, alpha, scale)
    assert abs(float(ref)) > 1e-3
    torch.testing.assert_close(out["loss"].detach(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sid"].detach(), ref, rtol=1e-4, atol=1e-5)

    def hand(scale):
        x_g, f_phi, f_psi, _ = _replay_generator_step(m, 3)
        scale = (x_g - f_phi).abs().mean((1, 2, 3), keepdim=True) if scale is None else scale
        return _hand_sid(x_g, f_phi, f_psi, alpha, scale), scale

    _descends(m, 0, hand)


def test_sida_generator_loss_by_hand_sid_alone_then_mixed(tiny_denoiser):
    m = _method(tiny_denoiser, alpha=1.0, adversarial=True, fake_warmup=2, adv_mix_after=3)
    _perturb(m.trainable["fake"])
    enc = _Encoder(m.trainable["fake"])
    batch = {"n": len(LABELS), "labels": LABELS}
    with torch.no_grad():
        x_g, f_phi, f_psi, logits = _replay_generator_step(m, 4, enc)
        scale = (x_g - f_phi).abs().mean((1, 2, 3), keepdim=True)
        sid, gan = _hand_sid(x_g, f_phi, f_psi, 1.0, scale), _hand_gan(x_g, logits, scale)
    assert abs(float(sid)) > 1e-3 and float(gan) > 0
    # before the mix-in point (iteration < fake_warmup + adv_mix_after) the generator trains on SiD alone
    torch.manual_seed(4)
    early = m.step(batch, it=4, phase="generator")
    torch.testing.assert_close(early["loss"].detach(), sid, rtol=1e-4, atol=1e-5)
    # after it: 0.5 SiD + 0.5 GAN, the GAN term weighted 0.01 per pixel against 100 for SiD, over SiD's scale
    torch.manual_seed(4)
    late = m.step(batch, it=5, phase="generator")
    torch.testing.assert_close(late["loss"].detach(), 0.5 * sid + 0.5 * gan, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(late["gan_weighted"].detach(), gan, rtol=1e-4, atol=1e-6)

    def hand(scale):
        x_g, f_phi, f_psi, logits = _replay_generator_step(m, 3, enc)
        scale = (x_g - f_phi).abs().mean((1, 2, 3), keepdim=True) if scale is None else scale
        return 0.5 * _hand_sid(x_g, f_phi, f_psi, 1.0, scale) + 0.5 * _hand_gan(x_g, logits, scale), scale

    _descends(m, 5, hand)


def test_sida_fake_step_loss_by_hand_shared_sigma_and_noise(tiny_denoiser):
    """DSM + lambda(sigma) (BCE_real + BCE_fake) / 2 / pixels, real and fake noised with the fake-score step's
    sigma ~ exp(N(-1.2, 1.2^2)) and the SAME noise."""
    m = _method(tiny_denoiser, alpha=1.0, adversarial=True)
    enc = _Encoder(m.trainable["fake"])
    gen = torch.Generator().manual_seed(0)
    batch = m.get_batch(gen, 4, torch.device("cpu"))
    torch.manual_seed(6)
    out = m.step(batch, it=0, phase="fake")
    torch.manual_seed(6)
    with torch.no_grad():
        z = torch.randn(4, 1, 32, 32)
        x_g = m.trainable["generator"](z, batch["labels"])
        sigma = (torch.randn(4) * 1.2 - 1.2).exp()
        s = sigma.reshape(-1, 1, 1, 1)
        n = torch.randn_like(x_g) * s
        w = edm_weight(s, 0.5)
        d_fake = m.trainable["fake"](x_g + n, sigma, batch["labels"])
        l_fake = enc.logits()
        m.trainable["fake"](batch["x"] + n, sigma, batch["labels"])
        l_real = enc.logits()
        dsm = (w * (d_fake - x_g) ** 2).mean((1, 2, 3)).mean()
        d_loss = w.mean() * (F.softplus(-l_real).mean() + F.softplus(l_fake).mean()) / 2
    torch.testing.assert_close(out["dsm"].detach(), dsm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["d_loss"].detach(), d_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), dsm + d_loss / 1024, rtol=1e-4, atol=1e-6)


def test_fake_score_learns_on_generated_images(tiny_denoiser):
    """The fake score's DSM loss on generated images (a fixed evaluation batch) falls over a few steps."""
    m = _method(tiny_denoiser)
    batch = {"n": 8, "labels": torch.arange(8) % 10}

    def held_out():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(m.step(batch, it=0, phase="fake")["dsm"])

    before = held_out()
    m.trainable["generator"].requires_grad_(False)
    opt = torch.optim.Adam(m.trainable["fake"].parameters(), lr=2e-3, betas=(0.0, 0.999))
    torch.manual_seed(0)
    for _ in range(15):
        opt.zero_grad()
        m.step(batch, it=0, phase="fake")["loss"].backward()
        opt.step()
    after = held_out()
    assert after < 0.8 * before, (before, after)


def test_sida_discriminator_separates_real_from_generated(tiny_denoiser):
    """Training on the discriminator loss alone, the fake score's encoder tells the bright real images from the
    tiny generator's images: real logits positive, fake logits negative, both accuracies above chance."""
    m = _method(tiny_denoiser, alpha=1.0, adversarial=True)
    m.trainable["generator"].requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(m.trainable["fake"].parameters(), lr=2e-3, betas=(0.0, 0.999))
    torch.manual_seed(0)
    first = None
    for _ in range(30):
        out = m.step(m.get_batch(gen, 8, torch.device("cpu")), it=0, phase="fake")
        first = first if first is not None else out
        opt.zero_grad()
        out["d_loss"].backward()
        opt.step()
    torch.manual_seed(99)
    with torch.no_grad():
        out = m.step(m.get_batch(gen, 32, torch.device("cpu")), it=0, phase="fake")
    assert float(out["d_real_acc"]) > 0.5 and float(out["d_fake_acc"]) > 0.5, out
    assert float(out["d_loss"]) < float(first["d_loss"].detach())


def test_sid_defaults_follow_the_reference():
    cfg = SiDConfig()
    assert (cfg.alpha, cfg.sigma_init, cfg.t_max, cfg.P_mean, cfg.P_std) == (1.2, 2.5, 800.0, -1.2, 1.2)
    assert cfg.fake_warmup == 0  # one fake-score step then one generator step from the first iteration
    assert cfg.optim_generator.lr == cfg.optim_fake.lr == 1e-5
    assert tuple(cfg.optim_generator.betas) == tuple(cfg.optim_fake.betas) == (0.0, 0.999)
    assert cfg.lambda_adv / cfg.lambda_sid == pytest.approx(1e-4) and cfg.lambda_d == 1.0
