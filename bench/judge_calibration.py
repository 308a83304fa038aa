"""Calibrate the judge's "unclear" shape outcome: template-fit statistics on clean renders
(every one must read correctly) and on a generator's reconstructions, plus a contact sheet
of reconstructions with the judge's reading under each, for a person to check.

    python bench/judge_calibration.py --weights weights/world --n 600 --sheet out/judge.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from stages.world.judge import FIT_MARGIN, FIT_MIN, UNCLEAR, judge_images
from stages.world.render import SHAPES, SIZES, WorldConfig, render_many, scenes
from stages.world.score import render_s
from stages.world.sspace import encode_s


def fit_stats(readings, truth) -> dict:
    out = {}
    for shape in SHAPES:
        for size in SIZES:
            idx = [i for i, s in enumerate(truth) if s.shape == shape and s.size == size]
            if not idx:
                continue
            fits = np.array([sorted(readings[i].fit.values())[-2:] for i in idx])
            out[f"{size} {shape}"] = {
                "n": len(idx),
                "correct": float(np.mean([readings[i].shape == shape for i in idx])),
                "unclear": float(np.mean([readings[i].shape == UNCLEAR for i in idx])),
                "best_fit_p5": float(np.percentile(fits[:, 1], 5)),
                "margin_p5": float(np.percentile(fits[:, 1] - fits[:, 0], 5)),
            }
    return out


def sheet(images: np.ndarray, readings, truth, path: str, n: int = 48) -> None:
    cell, cols = 96, 8
    rows = (min(n, len(images)) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(min(n, len(images))):
        x, y = (i % cols) * cell, (i // cols) * (cell + 14)
        canvas.paste(Image.fromarray(images[i]).resize((cell, cell), Image.NEAREST), (x, y))
        ok = readings[i].shape == truth[i].shape
        draw.text(
            (x + 2, y + cell),
            f"{truth[i].shape[:3]}->{readings[i].shape[:5]}",
            fill=(0, 120, 0) if ok else (200, 0, 0),
        )
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="weights/world", help="generator + e4e folder")
    ap.add_argument("--generator", default=None, help="generator file (default: in --weights)")
    ap.add_argument("--e4e", default=None, help="e4e file (default: in --weights)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--sheet", default=None, help="PNG contact sheet of reconstructions")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from model.e4e import load_e4e
    from model.stylegan2 import load_generator

    world = dataclasses.replace(WorldConfig(), seed=12345, n_images=args.n)
    truth = scenes(world)
    clean = render_many(truth, world)
    report = {
        "thresholds": {"fit_min": FIT_MIN, "fit_margin": FIT_MARGIN},
        "clean": fit_stats(judge_images(clean, world), truth),
    }
    G = load_generator(args.generator or f"{args.weights}/generator.safetensors")
    E = load_e4e(args.e4e or f"{args.weights}/e4e.safetensors")
    rec = render_s(G, encode_s(G, E, clean))
    rr = judge_images(rec, world)
    report["reconstructions"] = fit_stats(rr, truth)
    print(json.dumps(report, indent=1))
    if args.sheet:
        sheet(rec, rr, truth, args.sheet)
        print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
