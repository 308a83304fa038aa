"""Hybrid GAN inversion: the encoder's W+ refined by a few steps of optimisation.

    W+_0 = E(x)                                  (e4e: one forward pass)
    W+_{k+1} = Adam step on  |G(W+_k) - x|^2 + l1 * |G(W+_k) - x|   (per image, mean over pixels)

The encoder gives a W+ in the editable region of the generator; a short optimisation from
there recovers the details an encoder misses (corners, small shapes) without wandering far
from it (cf. in-domain inversion: encoder init + optimisation). Each image's loss is its own
term of a sum and Adam works element-wise, so an image's result does not depend on the
other images of its batch (only on the batch size, which the encode passes fix).
When G renders larger than x (FFHQ: e4e sees 256 px, G draws 1024), G's image is
area-downsampled to x's size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def refine_wplus(
    G: torch.nn.Module, x: Tensor, wplus: Tensor, steps: int, lr: float = 0.01, l1: float = 0.1
) -> Tensor:
    """x [B, 3, S, S] in [-1, 1], wplus [B, L, W] (the encoder's) -> refined W+ [B, L, W].

    G must provide `synthesize_w(wplus, "const")`; its weights are not touched (gradients
    are taken with respect to W+ only)."""
    if steps <= 0:
        return wplus
    x = x.detach().float()
    wp = wplus.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([wp], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            img = G.synthesize_w(wp, "const")  # [B, 3, R, R]
            if img.shape[-1] != x.shape[-1]:
                img = F.interpolate(img, size=x.shape[-2:], mode="area")
            err = img - x
            loss = err.square().mean((1, 2, 3)).sum() + l1 * err.abs().mean((1, 2, 3)).sum()
            (wp.grad,) = torch.autograd.grad(loss, wp)
            opt.step()
    return wp.detach()


def invert_wplus(
    G: torch.nn.Module, E: torch.nn.Module, x: Tensor, steps: int = 0, lr: float = 0.01
) -> Tensor:
    """x [B, 3, S, S] in [-1, 1] -> W+ [B, L, W]: E's, refined `steps` times."""
    with torch.no_grad():
        wplus = E(x)  # [B, L, W]
    return refine_wplus(G, x, wplus, steps, lr)


def invert_s(G: torch.nn.Module, E: torch.nn.Module, x: Tensor, steps: int = 0, lr: float = 0.01):
    """x [B, 3, S, S] in [-1, 1] -> s [B, D] = G.w_to_s(invert_wplus(...)) (what encode-s
    stores)."""
    wplus = invert_wplus(G, E, x, steps, lr)
    with torch.no_grad():
        return G.w_to_s(wplus)
