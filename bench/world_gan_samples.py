"""What the judge reads on a world generator's own samples (EMA generator, fixed z): the
share of clear scenes (every attribute read, no `unclear` shape) and each attribute's
distribution. Tracks a StyleGAN2-way training run between chunks.

    python bench/world_gan_samples.py weights/world/gan/generator.safetensors --n 512
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from model.stylegan2 import load_generator
from stages.world.judge import UNCLEAR, UNKNOWN, judge_images
from stages.world.render import WorldConfig


def sample_report(generator: str, n: int, seed: int) -> dict:
    G = load_generator(generator).eval()
    z = torch.randn(n, G.config.in_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        img = G.synthesize_w(G.wplus(G.mapping(z)), "const").clamp(-1, 1)
    u8 = ((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    reads = [r.attributes() for r in judge_images(u8, WorldConfig())]
    clear = np.mean([all(v not in (UNKNOWN, UNCLEAR) for v in a.values()) for a in reads])
    out: dict = {"generator": generator, "n": n, "clear": round(float(clear), 3)}
    for key in reads[0]:
        counts = collections.Counter(a[key] for a in reads)
        out[key] = {v: round(c / n, 3) for v, c in counts.most_common()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator", nargs="+", help="generator .safetensors file(s)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for g in args.generator:
        print(json.dumps(sample_report(g, args.n, args.seed)))


if __name__ == "__main__":
    main()
