"""What the judge reads on a world generator's own samples (EMA generator, fixed z): the
share of clear scenes (every attribute read, no `unclear` shape) and each attribute's
distribution. Tracks a StyleGAN2-way training run between chunks. With --probe, also the
S-space test on the samples (`stages.world.sspace.sample_probe`: each family's fitted S
direction added to held-out clear samples on conv / toRGB / per-level channels, judged).

    python bench/world_gan_samples.py weights/world/gan/generator.safetensors --n 512 --probe
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from model.stylegan2 import load_generator
from stages.world.judge import is_clear, judge_images
from stages.world.render import WorldConfig
from stages.world.score import render_s
from stages.world.sspace import sample_probe, sample_s


def sample_report(generator: str, n: int, seed: int) -> dict:
    G = load_generator(generator).eval()
    u8 = render_s(G, sample_s(G, n, seed))
    reads = [r.attributes() for r in judge_images(u8, WorldConfig())]
    clear = np.mean([is_clear(a) for a in reads])
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
    ap.add_argument("--probe", action="store_true", help="also the S-space probe on samples")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for g in args.generator:
        print(json.dumps(sample_report(g, args.n, args.seed)))
        if args.probe:
            rep = sample_probe(load_generator(g).eval(), WorldConfig())
            for fam, r in rep["families"].items():
                cells = [
                    f"{k} {v['target_reached']:.2f}/{v['others_kept']:.2f}"
                    for k, v in r.items()
                    if isinstance(v, dict) and "target_reached" in v
                ]
                print(f"  {fam:18s} (target/others kept) " + ", ".join(cells))
            print(f"  clear test samples {rep['clear_samples']}; {json.dumps(rep)}")


if __name__ == "__main__":
    main()
