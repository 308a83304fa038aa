"""Scoring edits in the shapes world against the known truth.

Given the source scenes of some rows, their edited S codes and the edit's
(attribute, value), `evaluate_edits` renders the edited codes with the world
generator, reads them with the independent judge (stages/world/judge.py, no CLIP)
and compares them with the counterfactual ground truth (the same scene with only
that attribute changed):

* target reached: the judge reads the target value;
* others kept: the judge reads every other attribute unchanged;
* PSNR and mask IoU (both masks read by the judge) against the counterfactual render;
* centroid drift: px between the edited shape's centroid and the true position.

A target value the judge does not know gives {"status": "unscorable"}, not a score.
The generic edit/evaluate stages call this through its plain function API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.world.judge import UNSCORABLE, judge_images, knows, read_image
from stages.world.render import (
    ATTRIBUTES,
    Scene,
    WorldConfig,
    counterfactual,
    from_unit,
    load_labels,
    render,
)

IOU_THRESHOLD = 0.5  # coverage above this counts as inside the shape


def scenes_for_ids(labels_dir: str | Path, ids: list[str]) -> tuple[WorldConfig, list[Scene]]:
    """Source scenes of store rows, by row id (the PNG stem `world render` wrote)."""
    world, scenes, rows = load_labels(labels_dir)
    by_id = {r["id"]: s for r, s in zip(rows, scenes, strict=True)}
    missing = [i for i in ids if str(i) not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} ids not in {labels_dir}/labels.json, e.g. {missing[:3]}")
    return world, [by_id[str(i)] for i in ids]


@torch.no_grad()
def render_s(generator: torch.nn.Module, s: np.ndarray, batch: int = 128) -> np.ndarray:
    """S codes [N, D] -> uint8 images [N, H, W, 3] (generator output clamped to [-1, 1])."""
    t = torch.as_tensor(np.asarray(s, np.float32))
    out = [
        generator.synthesize(t[i : i + batch], noise_mode="const").float().cpu().numpy()
        for i in range(0, len(t), batch)
    ]
    return from_unit(np.concatenate(out))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images [N, H, W, 3]; identical images give 100 dB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), 100.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two coverage maps thresholded at IOU_THRESHOLD."""
    ma, mb = a > IOU_THRESHOLD, b > IOU_THRESHOLD
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 0.0


def evaluate_edits(
    scenes: list[Scene],
    s_edit: np.ndarray,
    attribute: str,
    value: str,
    generator: torch.nn.Module,
    world: WorldConfig | None = None,
    s_source: np.ndarray | None = None,
    per_row: bool = False,
) -> dict[str, Any]:
    """Score one edit (attribute -> value) over rows whose truth is `scenes`.

    scenes: the source rows' scenes; s_edit [N, D]: their edited S codes; s_source
    [N, D] (optional): the unedited codes, for the no-edit baseline and for
    `others_kept_vs_reconstruction` (kept relative to the judge's reading of the
    unedited reconstruction, not of the clean source). Rows whose
    source already has the target value are counted (`n_already`) but left out of
    the means. Returns a JSON-ready dict.
    """
    world = world or WorldConfig()
    if len(scenes) != len(s_edit):
        raise ValueError(f"{len(scenes)} scenes but {len(s_edit)} edited S codes")
    if not knows(attribute, value):
        return {
            "status": UNSCORABLE,
            "attribute": attribute,
            "value": value,
            "reason": f"the judge does not know {attribute} = {value!r}",
            "n_rows": len(scenes),
        }
    edited = render_s(generator, s_edit)
    readings = judge_images(edited, world)
    truth = [counterfactual(s, attribute, value) for s in scenes]
    truth_images = np.stack([render(t, world) for t in truth])
    changed = np.array([getattr(s, attribute) != value for s in scenes])
    others = [a for a in ATTRIBUTES if a != attribute]

    reached = np.array([getattr(r, attribute) == value for r in readings])
    kept = {
        a: np.array([getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes, strict=True)])
        for a in others
    }
    all_kept = np.logical_and.reduce([kept[a] for a in others]) if others else reached
    psnr = psnr_uint8(edited, truth_images)
    truth_readings = judge_images(truth_images, world)  # same mask estimator on both sides
    iou = np.array(
        [mask_iou(r.mask, t.mask) for r, t in zip(readings, truth_readings, strict=True)]
    )
    drift = np.array(
        [np.hypot(r.cx - s.cx, r.cy - s.cy) for r, s in zip(readings, scenes, strict=True)]
    )
    lost = ~np.isfinite(drift)  # the judge found no shape

    rows = changed if changed.any() else np.ones(len(scenes), bool)

    def mean(x: np.ndarray) -> float | None:
        x = x[rows]
        x = x[np.isfinite(x)] if x.dtype.kind == "f" else x
        return float(np.mean(x)) if len(x) else None

    report: dict[str, Any] = {
        "status": "ok",
        "attribute": attribute,
        "value": value,
        "n_rows": len(scenes),
        "n_scored": int(rows.sum()),
        "n_already": int((~changed).sum()),
        "target_reached": mean(reached.astype(float)),
        "others_kept": {a: mean(kept[a].astype(float)) for a in others},
        "all_others_kept": mean(all_kept.astype(float)),
        "psnr_vs_counterfactual": mean(psnr),
        "mask_iou_vs_counterfactual": mean(iou),
        "centroid_drift_px": mean(drift),
        "shape_lost": mean(lost.astype(float)),
    }
    if s_source is not None:
        source = render_s(generator, s_source)
        report["no_edit_psnr_vs_counterfactual"] = mean(psnr_uint8(source, truth_images))
        source_truth = np.stack([render(s, world) for s in scenes])
        report["reconstruction_psnr"] = mean(psnr_uint8(source, source_truth))
        # the same judgements against what the judge reads in the unedited reconstruction:
        # separates what the edit changed from what the autoencoder already lost
        source_readings = judge_images(source, world)
        kept_rec = {
            a: np.array(
                [
                    getattr(r, a) == getattr(q, a)
                    for r, q in zip(readings, source_readings, strict=True)
                ]
            )
            for a in others
        }
        report["others_kept_vs_reconstruction"] = {
            a: mean(kept_rec[a].astype(float)) for a in others
        }
        report["reconstruction_judged_correct"] = {
            a: mean(
                np.array(
                    [
                        getattr(q, a) == getattr(t, a)
                        for q, t in zip(source_readings, scenes, strict=True)
                    ],
                    float,
                )
            )
            for a in ATTRIBUTES
        }
    if per_row:
        report["rows"] = {
            "reached": reached.tolist(),
            "all_others_kept": all_kept.tolist(),
            "psnr": psnr.tolist(),
            "mask_iou": iou.tolist(),
            "centroid_drift_px": [float(d) if np.isfinite(d) else None for d in drift],
        }
    return report


def judge_reading_of(image: np.ndarray, world: WorldConfig | None = None) -> dict[str, Any]:
    """One uint8 image -> the judge's attributes + centroid (a convenience for reports)."""
    r = read_image(image, world or WorldConfig())
    return {**r.attributes(), "cx": r.cx, "cy": r.cy, "area": r.area}
