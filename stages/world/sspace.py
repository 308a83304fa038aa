"""Does the world generator's S space support DeltaEdit? Tested before any mapper.

For each edit family (any colour -> blue, any shape -> triangle, any background ->
black, any size -> large) over held-out rows:

* oracle: s' = s + (E(x_cf) - E(x)) on the conv channels only (toRGB styles stay the
  source's, as DeltaEdit edits), x_cf the true counterfactual render; scored by the
  judge like an edit (target reached, others kept, PSNR vs the counterfactual, drift);
* per level: the same delta restricted to the coarse / medium / fine conv channels;
* channels: the family's mean conv delta in units of each channel's std over rows;
  how many channels hold 50% / 80% / 95% of its energy, and the target reached when
  only the top-k channels of that mean delta are applied to every row (k = 1, 3, 10, 30,
  100): the world's analogue of StyleSpace's few channels per attribute.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from model.layout import LEVELS
from stages.world.judge import judge_images
from stages.world.render import WorldConfig, counterfactual, render_many, scenes, to_unit
from stages.world.score import evaluate_edits, render_s

FAMILIES: tuple[tuple[str, str], ...] = (
    ("color", "blue"),
    ("shape", "triangle"),
    ("background", "black"),
    ("size", "large"),
)
TOP_K = (1, 3, 10, 30, 100)
HELD_OUT_SEED_OFFSET = 1000


@torch.no_grad()
def encode_s(G: Any, E: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [N, R, R, 3] -> s [N, D] through the encoder (W+) and G.w_to_s."""
    x = torch.from_numpy(to_unit(images))
    return np.concatenate([G.w_to_s(E(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def _scores(report: dict) -> dict[str, Any]:
    keys = ("target_reached", "all_others_kept", "psnr_vs_counterfactual", "centroid_drift_px")
    return {k: report.get(k) for k in keys}


def s_space_report(
    G: Any, E: Any, world: WorldConfig, n_rows: int = 256, seed_offset: int = HELD_OUT_SEED_OFFSET
) -> dict[str, Any]:
    """The oracle conv-only S edits of every family on `n_rows` held-out scenes."""
    held = dataclasses.replace(world, seed=world.seed + seed_offset, n_images=n_rows)
    rows = scenes(held)
    s_src = encode_s(G, E, render_many(rows, held))
    conv = G.layout.conv_index()
    std = s_src[:, conv].std(0) + 1e-8
    level_of = np.concatenate([[la.level] * la.channels for la in G.layout.conv_layers])  # [Dconv]
    out: dict[str, Any] = {"n_rows": n_rows, "families": {}}
    for attribute, value in FAMILIES:
        cf = [counterfactual(s, attribute, value) for s in rows]
        s_cf = encode_s(G, E, render_many(cf, held))  # [N, D], encoded once
        delta = s_cf[:, conv] - s_src[:, conv]  # [N, Dconv]

        def edited(d: np.ndarray) -> np.ndarray:
            s = s_src.copy()
            s[:, conv] += d
            return s

        fam: dict[str, Any] = {
            "oracle_conv": _scores(
                evaluate_edits(rows, edited(delta), attribute, value, G, held, s_source=s_src)
            )
        }
        fam["oracle_all_channels"] = _scores(
            evaluate_edits(rows, encode_s(G, E, render_many(cf, held)), attribute, value, G, held)
        )
        fam["levels"] = {}
        for level in LEVELS:
            m = level_of == level
            if not m.any():
                continue
            fam["levels"][level] = _scores(
                evaluate_edits(rows, edited(delta * m), attribute, value, G, held)
            )
            fam["levels"][level]["energy_share"] = float(
                (delta[:, m] ** 2).sum() / max((delta**2).sum(), 1e-12)
            )
        changed = np.array([getattr(s, attribute) != value for s in rows])
        mean = delta[changed].mean(0) / std  # [Dconv] in channel-std units
        energy = np.sort(mean**2)[::-1]
        cum = np.cumsum(energy) / max(energy.sum(), 1e-12)
        fam["channels_for_energy"] = {
            f"{int(q * 100)}%": int(np.searchsorted(cum, q) + 1) for q in (0.5, 0.8, 0.95)
        }
        order = np.argsort(-np.abs(mean))
        topk = {}
        for k in TOP_K:
            d = np.zeros_like(mean)
            d[order[:k]] = mean[order[:k]] * std[order[:k]]
            r = evaluate_edits(
                rows, edited(np.broadcast_to(d, delta.shape)), attribute, value, G, held
            )
            topk[str(k)] = {
                "target_reached": r["target_reached"],
                "all_others_kept": r["all_others_kept"],
            }
        fam["top_k_mean_delta"] = topk
        fam["top_channels"] = [
            {"index": int(i), "level": str(level_of[i]), "delta_std": round(float(mean[i]), 2)}
            for i in order[:5]
        ]
        out["families"][f"{attribute}={value}"] = fam
    rec = judge_images(render_s(G, s_src), held)
    out["judge_on_reconstructions"] = {
        a: float(np.mean([getattr(r, a) == getattr(s, a) for r, s in zip(rec, rows, strict=True)]))
        for a in ("shape", "color", "background", "size")
    }
    return out
