"""Losses of the tokenizer recipe: pixel L1/L2, LPIPS (training/lpips.py), and the PatchGAN hinge
adversarial loss with VQGAN's adaptive weight.

References: Isola et al. 2017 (pix2pix, arXiv 1611.07004) for the N-layer PatchGAN; Esser et al. 2021
(VQGAN / taming-transformers, arXiv 2012.09841, §3.2 and eq. 7) for the hinge losses and the adaptive
weight, as LlamaGen's VQ training (Sun et al. 2024, arXiv 2406.06525) uses them too.

The trainer applies the generator losses in two stages (`Trainer.train_step`): they are computed on
a detached copy r of the reconstruction, their gradients with respect to r are taken, and the model
then backpropagates ⟨x̂, g⟩ once. The adaptive weight needs the two losses' gradients at the
decoder's last layer W; since x̂ = conv_W(a), ∇_W L = J_Wᵀ ∂L/∂x̂, which `last_layer_grads` gets from
the output gradients through that one layer, without a second pass through LPIPS or the
discriminator (the same numbers as VQGAN's autograd.grad(L, W))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- pixels ---


def l1_loss(x: Tensor, y: Tensor) -> Tensor:
    return F.l1_loss(x, y)


def l2_loss(x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(x, y)


# --- adversarial ---


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN (pix2pix; taming-transformers' NLayerDiscriminator): (B, 3, H, W) ->
    (B, 1, h, w) real/fake logits, one per overlapping patch (70×70 pixels with 3 layers).

    GroupNorm instead of the original BatchNorm: the logits of an image do not depend on the rest of
    its batch (the discriminator sees real and fake images in one batch) and no running statistics
    need synchronising across DDP ranks. Weights initialised as in taming: N(0, 0.02) convolutions,
    N(1, 0.02) norm scales."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out), out), nn.LeakyReLU(0.2, True)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """L_D = ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])  (taming's hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """L_G = −E[D(x̂)]  (the hinge GAN's generator loss)."""
    return -logits_fake.mean()


def last_layer_grads(output: Tensor, last_layer: Tensor, *output_grads: Tensor) -> list[Tensor]:
    """∇_W L for each given ∂L/∂output, where `output` depends on W = `last_layer` (the model's graph
    is kept for its backward). Equal to autograd.grad(L, W) for every L that reaches W only through
    `output`."""
    return [torch.autograd.grad(output, last_layer, g, retain_graph=True)[0] for g in output_grads]


def adaptive_weight(rec_grad: Tensor, gan_grad: Tensor, max_weight: float = 1e4, eps: float = 1e-4) -> Tensor:
    """VQGAN eq. 7: λ = ‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-4), clamped to [0, max_weight], detached; the
    gradients are at the decoder's last layer W, L_rec is every reconstruction term (pixels + LPIPS)."""
    return (rec_grad.norm() / (gan_grad.norm() + eps)).clamp(0.0, max_weight).detach()
