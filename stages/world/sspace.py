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

from model.inversion import invert_s
from model.layout import LEVELS
from stages.encode_s import NO_REFINE
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


def encode_s(
    G: Any, E: Any, images: np.ndarray, batch: int = 256, refine: tuple[int, float] = NO_REFINE
) -> np.ndarray:
    """uint8 [N, R, R, 3] -> s [N, D] through the encoder (W+, refined as encode-s does with
    `encode_s.refine_steps`) and G.w_to_s."""
    x = torch.from_numpy(to_unit(images))
    return np.concatenate(
        [invert_s(G, E, x[i : i + batch], *refine).numpy() for i in range(0, len(x), batch)]
    )


def _scores(report: dict) -> dict[str, Any]:
    keys = ("target_reached", "all_others_kept", "psnr_vs_counterfactual", "centroid_drift_px")
    return {k: report.get(k) for k in keys}


def s_space_report(
    G: Any,
    E: Any,
    world: WorldConfig,
    n_rows: int = 256,
    seed_offset: int = HELD_OUT_SEED_OFFSET,
    refine: tuple[int, float] = NO_REFINE,
) -> dict[str, Any]:
    """The oracle conv-only S edits of every family on `n_rows` held-out scenes, rows
    inverted as encode-s does (e4e, + `refine` = (steps, lr) of W+ refinement)."""
    held = dataclasses.replace(world, seed=world.seed + seed_offset, n_images=n_rows)
    rows = scenes(held)
    s_src = encode_s(G, E, render_many(rows, held), refine=refine)
    conv = G.layout.conv_index()
    std = s_src[:, conv].std(0) + 1e-8
    level_of = np.concatenate([[la.level] * la.channels for la in G.layout.conv_layers])  # [Dconv]
    out: dict[str, Any] = {"n_rows": n_rows, "refine": list(refine), "families": {}}
    for attribute, value in FAMILIES:
        cf = [counterfactual(s, attribute, value) for s in rows]
        s_cf = encode_s(G, E, render_many(cf, held), refine=refine)  # [N, D], encoded once
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
        fam["oracle_all_channels"] = _scores(evaluate_edits(rows, s_cf, attribute, value, G, held))
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


def _index(G: Any, kind: str, level: str | None = None) -> np.ndarray:
    """Flat S indices of the layers of one kind (conv / torgb), optionally one level."""
    return np.concatenate(
        [
            np.arange(la.offset, la.offset + la.channels)
            for la in G.layout.layers
            if la.kind == kind and (level is None or la.level == level)
        ]
        or [np.zeros(0, dtype=int)]
    )


@torch.no_grad()
def sample_s(G: Any, n: int, seed: int) -> np.ndarray:
    """s [n, D] of the generator's own samples: z ~ N(0, I) -> w -> S (no truncation)."""
    z = torch.randn(n, G.config.in_dim, generator=torch.Generator().manual_seed(seed))
    return G.w_to_s(G.wplus(G.mapping(z))).numpy()


def attribute_directions(
    s: np.ndarray, reads: list[dict[str, str]]
) -> dict[str, dict[str, np.ndarray]]:
    """Per attribute value, its S direction [D]: least squares of s on the one-hot readings
    of all four attributes at once (an intercept + one column per value; `unclear` shapes
    get a column of their own), so a value's direction is not confounded by the other
    attributes it happens to co-occur with in the samples. Rows with an attribute the judge
    could not read (`unknown`) are left out."""
    from stages.world.judge import UNKNOWN

    keep = [i for i, a in enumerate(reads) if UNKNOWN not in a.values()]
    columns = [
        (k, v)
        for k in ("shape", "color", "background", "size")
        for v in sorted({reads[i][k] for i in keep})
    ]
    X = np.zeros((len(keep), 1 + len(columns)), np.float64)
    X[:, 0] = 1.0
    for r, i in enumerate(keep):
        for c, (k, v) in enumerate(columns):
            X[r, 1 + c] = reads[i][k] == v
    B = np.linalg.lstsq(X, s[keep].astype(np.float64), rcond=None)[0]  # [1 + C, D]
    out: dict[str, dict[str, np.ndarray]] = {}
    for c, (k, v) in enumerate(columns):
        out.setdefault(k, {})[v] = B[1 + c].astype(np.float32)
    return out


def sample_probe(
    G: Any,
    world: WorldConfig,
    n_fit: int = 2048,
    n_test: int = 256,
    seed: int = 0,
    alphas: tuple[float, ...] = (1.0, 1.5, 2.0),
) -> dict[str, Any]:
    """The S-space test on the generator's own samples, before any encoder exists.

    The judge reads `n_fit` samples; `attribute_directions` fits each value's S direction.
    A test sample (one of `n_test` others, clear, not already the target) is edited by
    alpha * (direction of the target - direction of its own value): on the conv channels
    only (as DeltaEdit edits), on each level's conv channels alone, and on the toRGB
    channels alone; the edits are judged: target reached = the judge reads the target;
    others kept = it reads every other attribute as it read the source. An unclear reading
    fails both."""
    from stages.world.judge import is_clear as clear

    def reads(s: np.ndarray) -> list[dict[str, str]]:
        return [r.attributes() for r in judge_images(render_s(G, s), world)]

    s_fit = sample_s(G, n_fit, seed)
    s_test = sample_s(G, n_test, seed + 1)
    fit_reads, test_reads = reads(s_fit), reads(s_test)
    test_clear = np.array([clear(a) for a in test_reads])
    directions = attribute_directions(s_fit, fit_reads)
    where = {"conv": G.layout.conv_index(), "torgb": _index(G, "torgb")}
    for level in LEVELS:
        if len(idx := _index(G, "conv", level)):
            where[f"conv {level}"] = idx
    out: dict[str, Any] = {
        "n_fit": n_fit,
        "n_test": n_test,
        "clear_samples": round(float(test_clear.mean()), 3),
        "families": {},
    }

    def judged(rows: np.ndarray, s: np.ndarray, attribute: str, value: str) -> dict[str, float]:
        after = reads(s)
        hit = [clear(a) and a[attribute] == value for a in after]
        kept = [
            clear(a) and all(a[k] == test_reads[i][k] for k in a if k != attribute)
            for a, i in zip(after, rows, strict=True)
        ]
        return {
            "target_reached": round(float(np.mean(hit)), 3),
            "others_kept": round(float(np.mean(kept)), 3),
        }

    for attribute, value in FAMILIES:
        dirs = directions.get(attribute, {})
        rows = np.flatnonzero(test_clear & np.array([a[attribute] != value for a in test_reads]))
        fam: dict[str, Any] = {"test_rows": int(len(rows))}
        if value not in dirs or not len(rows):
            fam["note"] = "no clear samples of this value to fit or to test"
            out["families"][f"{attribute}={value}"] = fam
            continue
        delta = np.stack([dirs[value] - dirs[test_reads[i][attribute]] for i in rows])  # [n, D]
        energy = (delta**2).sum()
        for name, idx in where.items():
            s = s_test[rows].copy()
            s[:, idx] += delta[:, idx]
            fam[name] = judged(rows, s, attribute, value)
            fam[name]["energy_share"] = round(float((delta[:, idx] ** 2).sum() / energy), 3)
        conv = where["conv"]
        for alpha in alphas:
            s = s_test[rows].copy()
            s[:, conv] += alpha * delta[:, conv]
            fam.setdefault("conv_alpha", {})[str(alpha)] = judged(rows, s, attribute, value)
        out["families"][f"{attribute}={value}"] = fam
    return out
