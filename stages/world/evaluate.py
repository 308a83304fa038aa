"""World-evaluate stage: edits scored against the shapes world's known truth.

For every edit in `edits_dir` whose target prompt names one world value
(`prompt_to_target`), on held-out rows (the trainer's split, else a seeded sample):

* edit:                 the stored edit (whatever method made it);
* no_edit:              the source codes S unchanged (floor);
* oracle_image_delta:   the mapper conditioned on the *true* image delta,
                        cond = [c_hat_i || normalize(c_hat_true - c_hat_i)] (c_hat =
                        normalized CLIP embedding, as the trainer builds its conditions)
                        with x_true the counterfactual rendered by the world renderer and
                        encoded like encode-clip (same model, same preprocessing);
* global_direction:     StyleCLIP's global direction from the relevance (no mapper),
                        with the edit's delta_t, alpha, beta and levels;
* truth_reconstruction: e4e + generator applied to the counterfactual itself: the
                        ceiling this autoencoder allows.

Each is scored by stages.world.score.evaluate_edits (judge: target reached, others kept,
PSNR and mask IoU vs the counterfactual, centroid drift). Results per edit and per
family (color, shape, background, size) go to `<out>/metrics.json`; the counterfactual
images go to `<truth_dir>/<edit>/<row:08d>.png`, the render stage's extra column.
A prompt naming no world value is reported "unscorable", never given a score.

For the render stage, which knows nothing of the world, two data files in `truth_dir`:
`row_labels.json` ({row id: "red small circle on white"}, every store row the labels
know) and `row_marks.json` ({"legend": ..., "edits": {edit: {row id: "already triangle"}}}:
per scorable edit, the edited rows whose source already has the target, where the edit
does not apply and which the scores leave out). `render.row_labels` / `render.row_marks`
name them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef, resolve_device
from stages.config import require
from stages.encode_s import NO_REFINE
from stages.world.render import HELD_OUT_SYNONYMS, SYNONYMS

FAMILIES: tuple[str, ...] = ("color", "shape", "background", "size")
METHODS: tuple[str, ...] = (
    "edit",
    "no_edit",
    "oracle_image_delta",
    "global_direction",
    "truth_reconstruction",
)
# the targets (every family)
TARGETS: dict[str, tuple[str, float]] = {
    "target_reached": (">=", 0.95),
    "all_others_kept": (">=", 0.95),
    "psnr_vs_counterfactual": (">=", 24.0),
    "centroid_drift_px": ("<=", 1.0),
}
SUMMARY_KEYS: tuple[str, ...] = (
    "target_reached",
    "all_others_kept",
    "psnr_vs_counterfactual",
    "mask_iou_vs_counterfactual",
    "centroid_drift_px",
)


# --- prompts -> world targets ---------------------------------------------------------


def _vocabulary() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value) for every word the world knows, longest phrases first."""
    out = []
    for table in (SYNONYMS, HELD_OUT_SYNONYMS):
        for attribute, values in table.items():
            for value, words in values.items():
                out.extend((w.lower(), attribute, value) for w in (value, *words))
    return sorted(set(out), key=lambda t: (-len(t[0]), t))


VOCABULARY = _vocabulary()


def prompt_to_target(prompt: str) -> tuple[str, str] | None:
    """The (attribute, value) a prompt asks for, from the world's words (canonical, caption
    synonyms, held-out synonyms); None when it names no known value or several different ones.

    "blue shape" -> ("color", "blue"); "a wedge" -> ("shape", "triangle").
    """
    text = " " + " ".join(re.findall(r"[a-z]+", str(prompt).lower())) + " "
    found: set[tuple[str, str]] = set()
    for phrase, attribute, value in VOCABULARY:
        key = f" {phrase} "
        if key in text:
            found.add((attribute, value))
            text = text.replace(key, " | ")  # "bright white" is not also "white"
    return found.pop() if len(found) == 1 else None


# --- config -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldEvaluateConfig:
    """`world_evaluate:` in params."""

    edits: tuple[str, ...] = ()  # empty = every edit in edits_dir
    edits_dir: str = "data/edits"
    store: str = "data/images"
    labels: str = "data/world"  # labels.json of `world render`
    mapper: str = "data/mapper.safetensors"
    relevance: str = "data/relevance.zarr"
    n_rows: int = 64
    seed: int = 0
    out: str = "data/metrics/world"
    truth_dir: str = "data/world_truth"
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5)  # x the edit's alpha, for the report
    methods: tuple[str, ...] = METHODS

    def validate(self) -> None:
        from stages.edit import check_name

        for i, name in enumerate(self.edits):
            check_name(name, f"edits[{i}]")
        require(self.n_rows >= 1, "n_rows", self.n_rows, "an integer >= 1")
        for a in self.alphas:
            ok = isinstance(a, (int, float)) and np.isfinite(a) and abs(a) <= 10
            require(ok, "alphas", a, "finite numbers in [-10, 10]")
        require(len(self.methods) >= 1, "methods", list(self.methods), f"a subset of {METHODS}")
        for m in self.methods:
            require(m in METHODS, "methods", m, f"one of {list(METHODS)}")
        require("edit" in self.methods, "methods", list(self.methods), "a list containing edit")


class WorldEvaluateError(ValueError):
    """Bad input (no edits, rows not from the world ...): one line."""


# --- models and codes ---------------------------------------------------------------


@dataclass
class Models:
    generator: Any
    clip: Any
    preprocessing: str
    e4e: Any | None = None
    mapper: Any | None = None
    relevance: Any | None = None  # stages.edit.Relevance
    refine: tuple[int, float] = NO_REFINE  # e4e's W+ refinement, as encode-s made the rows


@torch.no_grad()
def clip_embed(clip: Any, images: np.ndarray, preprocessing: str) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, E], exactly as encode-clip embeds PNG files."""
    from PIL import Image

    from stages.encode_clip import clip_inputs, clip_pixels

    arrays = [clip_pixels(Image.fromarray(im), preprocessing, clip.image_size) for im in images]
    x = clip_inputs(clip, arrays, preprocessing)
    return clip.model.encode_image(x).float().cpu().numpy()


def reconstruct_s(
    e4e: Any, generator: Any, images: np.ndarray, refine: tuple[int, float] = NO_REFINE
) -> np.ndarray:
    """uint8 [N, H, W, 3] -> S [N, D] through e4e (+ the store's refinement) + w_to_s, as
    encode-s does."""
    from PIL import Image

    from model.inversion import invert_s
    from stages.encode_s import e4e_pixels

    arrays = [e4e_pixels(Image.fromarray(im), e4e.input_size) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return invert_s(generator, e4e, x, *refine).float().cpu().numpy()


@torch.no_grad()
def oracle_s(
    mapper: Any,
    s: np.ndarray,
    c: np.ndarray,
    c_true: np.ndarray,
    layout: Any,
    mean_pull: float = 1.0,
) -> np.ndarray:
    """s + mapper(s_conv, [c_hat || normalize(c_hat_true - c_hat)]) on the mapper's channels
    (conv, or all for a mapper trained with train.channels all); the edit's own form
    (mapped_delta with the edit's mean_pull: 1 = plain, below 1 = antisymmetric)."""
    from stages.edit import mapped_delta
    from stages.train import make_cond

    idx = getattr(mapper, "s_layout", layout).conv_index()  # the mapper's channels
    s_conv = torch.from_numpy(np.ascontiguousarray(s[:, idx]))
    cond = make_cond(torch.from_numpy(c).float(), torch.from_numpy(c_true).float())
    delta = mapped_delta(mapper, s_conv, cond, mean_pull).float().numpy()
    out = np.array(s, np.float32, copy=True)
    out[:, idx] += delta
    return out


def global_direction_s(rel: Any, s: np.ndarray, attrs: dict, layout: Any) -> np.ndarray:
    """s + the StyleCLIP global direction for the edit's delta_t / alpha / beta / levels."""
    from stages.edit import TargetDelta, beta_mask, global_direction_delta, level_mask

    levels = attrs.get("levels") or ("coarse", "medium", "fine")
    lv = level_mask(layout, levels)
    targets = []
    for prompt, dt, alpha in zip(attrs["targets"], attrs["delta_t"], attrs["alphas"], strict=True):
        d = torch.tensor(dt, dtype=torch.float32)
        keep = beta_mask(rel.directions, d, float(attrs.get("beta", 0.0))).cpu()
        targets.append(TargetDelta(prompt, d, float(alpha), keep & lv))
    s_std = torch.as_tensor(rel.s_std[layout.conv_index()])
    delta = global_direction_delta(rel.directions, s_std, targets).float().cpu().numpy()
    out = np.array(s, np.float32, copy=True)
    out[:, layout.conv_index()] += delta[None]
    return out


def summary(report: dict) -> dict[str, Any]:
    """The headline numbers of one evaluate_edits report."""
    if report.get("status") != "ok":
        return {"status": report.get("status"), "reason": report.get("reason")}
    return {"status": "ok", "n_scored": report["n_scored"]} | {
        k: report.get(k) for k in SUMMARY_KEYS
    }


# --- the stage ----------------------------------------------------------------------


def truth_images_for(scenes: Sequence[Any], attribute: str, value: str, world: Any) -> np.ndarray:
    from stages.world.render import counterfactual, render_many

    return render_many([counterfactual(s, attribute, value) for s in scenes], world)


def write_truth(
    truth_dir: str | Path,
    name: str,
    rows: np.ndarray,
    images: np.ndarray,
    storage_options: dict | None = None,
) -> list[str]:
    """`<truth_dir>/<edit>/<row:08d>.png` (a folder or URL): the render stage's extra column."""
    from stages.render import encode_image, row_file
    from store import fs as storefs

    folder = storefs.join(str(truth_dir), name)
    storefs.makedirs(folder, storage_options)
    paths = []
    for r, im in zip(rows.tolist(), images, strict=True):
        p = storefs.join(folder, row_file(int(r), ".png"))
        storefs.write_bytes(p, encode_image(im, "png"), storage_options)
        paths.append(p)
    return paths


MARK_LEGEND = "the source already has the edit's target: the edit does not apply (not scored)"


def row_caption(scene: Any) -> str:
    """What a world row shows, in words: "red small circle on white"."""
    return f"{scene.color} {scene.size} {scene.shape} on {scene.background}"


def already_text(attribute: str, value: str) -> str:
    """The mark of a row that already has the target: "already triangle"."""
    return f"already {value}" + (" background" if attribute == "background" else "")


def row_marks(
    ids: Sequence[str], scenes: Sequence[Any], attribute: str, value: str
) -> dict[str, str]:
    """{row id: mark} for the rows whose source scene already has `attribute` = `value`."""
    text = already_text(attribute, value)
    return {
        str(i): text for i, sc in zip(ids, scenes, strict=True) if getattr(sc, attribute) == value
    }


def write_row_files(
    truth_dir: str,
    labels: dict[str, str],
    marks: dict[str, dict[str, str]],
    storage_options: dict | None = None,
) -> tuple[str, str]:
    """`<truth_dir>/row_labels.json` and `row_marks.json`: what render.row_labels and
    render.row_marks read."""
    from store import fs as storefs

    storefs.makedirs(truth_dir, storage_options)
    p_labels = storefs.join(truth_dir, "row_labels.json")
    p_marks = storefs.join(truth_dir, "row_marks.json")
    storefs.write_text_atomic(p_labels, json.dumps(labels, sort_keys=True), storage_options)
    doc = {"legend": MARK_LEGEND, "edits": marks}
    storefs.write_text_atomic(p_marks, json.dumps(doc, indent=1, sort_keys=True), storage_options)
    return p_labels, p_marks


def evaluate_one(
    name: str,
    attrs: dict,
    rows: np.ndarray,
    s: np.ndarray,
    s_edit: np.ndarray,
    c: np.ndarray,
    scenes: list[Any],
    world: Any,
    models: Models,
    layout: Any,
    cfg: WorldEvaluateConfig,
) -> dict[str, Any]:
    """Every method's report for one edit (status unscorable when the prompt is not known)."""
    from stages.world.score import evaluate_edits

    targets = list(attrs.get("targets") or [])
    parsed = prompt_to_target(targets[0]) if len(targets) == 1 else None
    base = {
        "targets": targets,
        "neutral": attrs.get("neutral"),
        "edit_method": attrs.get("method"),
        "n_rows": int(len(rows)),
    }
    if parsed is None:
        why = (
            "composed edits (several targets) are not scored"
            if len(targets) > 1
            else f"the prompt {targets[:1]} names no single world value"
        )
        return base | {"status": "unscorable", "reason": why}
    attribute, value = parsed
    base |= {"status": "ok", "family": attribute, "attribute": attribute, "value": value}

    def score(s_new: np.ndarray, with_source: bool = False) -> dict:
        return evaluate_edits(
            scenes, s_new, attribute, value, models.generator, world, s if with_source else None
        )

    methods: dict[str, Any] = {"edit": score(s_edit, with_source=True)}
    unavailable: dict[str, str] = {}
    if "no_edit" in cfg.methods:
        methods["no_edit"] = score(s)
    truth = None
    if {"oracle_image_delta", "truth_reconstruction"} & set(cfg.methods):
        truth = truth_images_for(scenes, attribute, value, world)
    if "oracle_image_delta" in cfg.methods:
        if models.mapper is None:
            unavailable["oracle_image_delta"] = f"no mapper at {cfg.mapper}"
        else:
            c_true = clip_embed(models.clip, truth, models.preprocessing)
            pull = attrs.get("mean_pull")  # the form the edit applied (None: no mapper)
            pull = 1.0 if pull is None else float(pull)
            methods["oracle_image_delta"] = score(
                oracle_s(models.mapper, s, c, c_true, layout, pull)
            )
    if "global_direction" in cfg.methods:
        if models.relevance is None:
            unavailable["global_direction"] = f"no relevance at {cfg.relevance}"
        else:
            methods["global_direction"] = score(
                global_direction_s(models.relevance, s, attrs, layout)
            )
    if "truth_reconstruction" in cfg.methods:
        if models.e4e is None:
            unavailable["truth_reconstruction"] = "no e4e encoder"
        else:
            methods["truth_reconstruction"] = score(
                reconstruct_s(models.e4e, models.generator, truth, models.refine)
            )
    sweep = {}
    for a in cfg.alphas:  # the stored delta scaled: exact for a single-target edit
        sweep[f"{a:g}"] = summary(score(s + float(a) * (s_edit - s)))
    edit_report = methods["edit"]
    return base | {
        "methods": {m: summary(r) for m, r in methods.items()},
        "unavailable": unavailable,
        "alpha_sweep": sweep,
        "others_kept": edit_report.get("others_kept"),
        "others_kept_vs_reconstruction": edit_report.get("others_kept_vs_reconstruction"),
        "reconstruction_psnr": edit_report.get("reconstruction_psnr"),
        "reconstruction_judged_correct": edit_report.get("reconstruction_judged_correct"),
    }


def by_family(edits: dict[str, dict]) -> dict[str, dict]:
    """Per family and method: the row-weighted mean of each headline number."""
    out: dict[str, dict] = {}
    for fam in FAMILIES:
        scored = [e for e in edits.values() if e.get("status") == "ok" and e["family"] == fam]
        if not scored:
            out[fam] = {"status": "no scorable edit"}
            continue
        fam_out: dict[str, Any] = {
            "status": "ok",
            "edits": sorted(
                n for n, e in edits.items() if e.get("status") == "ok" and e["family"] == fam
            ),
        }
        for m in METHODS:
            reps = [
                e["methods"][m] for e in scored if e["methods"].get(m, {}).get("status") == "ok"
            ]
            if not reps:
                continue
            agg: dict[str, Any] = {"n_scored": int(sum(r["n_scored"] for r in reps))}
            for k in SUMMARY_KEYS:
                vals = [(r[k], r["n_scored"]) for r in reps if r.get(k) is not None]
                w = sum(n for _, n in vals)
                agg[k] = float(sum(v * n for v, n in vals) / w) if w else None
            fam_out[m] = agg
        if "edit" in fam_out:
            fam_out["meets_targets"] = meets(fam_out["edit"])
        out[fam] = fam_out
    return out


def meets(numbers: dict) -> dict[str, bool | None]:
    res: dict[str, bool | None] = {}
    for k, (op, bound) in TARGETS.items():
        v = numbers.get(k)
        res[k] = None if v is None else (v >= bound if op == ">=" else v <= bound)
    return res


def run(
    cfg: WorldEvaluateConfig,
    generator_ref: GeneratorRef | None = None,
    clip_ref: ClipRef | None = None,
    e4e_ref: E4ERef | None = None,
    execution: ExecutionConfig | None = None,
    *,
    generator: Any | None = None,
    clip: Any | None = None,
    e4e: Any | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Score every edit against the world truth; write metrics.json and the truth images."""
    from model.layout import SLayout
    from stages.edit import _load_mapper, _manifest_ids, dataset_urls, load_relevance
    from stages.evaluate import held_out_rows
    from stages.execution import load_clip_ref, load_e4e_ref, load_generator_ref
    from stages.render import discover_edits
    from stages.world.render import load_labels
    from stages.world.score import scenes_for_ids
    from store import RowStore
    from store import fs as storefs

    t0 = time.perf_counter()
    clip_ref = clip_ref or ClipRef()
    execution = execution or ExecutionConfig()
    device = resolve_device(execution.device)
    if device != "cpu":  # the judge and the renderer are numpy; the models are small
        device = "cpu"
    so = execution.storage_options
    storefs.check_reachable(cfg.out, so)
    names = list(cfg.edits) or discover_edits(cfg.edits_dir, so)
    if not names:
        raise WorldEvaluateError(f"no edits in {cfg.edits_dir} (run `deltaedit edit` first)")
    stores = {
        n: RowStore.open(storefs.join(cfg.edits_dir, f"{n}.zarr"), storage_options=so)
        for n in names
    }
    urls = dataset_urls(cfg.store)
    src = RowStore.open(urls["s"], storage_options=so)
    c_store = RowStore.open(urls["clip"], storage_options=so)
    layout = SLayout.from_dict(src.attrs["layout"])
    ids = _manifest_ids(urls["manifest"], src.n_rows, so)
    if ids is None:
        raise WorldEvaluateError(f"{urls['manifest']}: no row ids (run `deltaedit ingest`)")
    generator = generator or load_generator_ref(generator_ref or GeneratorRef(), device)
    clip = clip or load_clip_ref(clip_ref, device)
    if e4e is None and "truth_reconstruction" in cfg.methods and e4e_ref is not None:
        e4e = load_e4e_ref(e4e_ref, device)
    mapper = None
    if "oracle_image_delta" in cfg.methods and storefs.exists(cfg.mapper, so):
        mapper, _ = _load_mapper(cfg.mapper, layout, clip.embed_dim, so)
        mapper = mapper.eval()
    relevance = None
    if "global_direction" in cfg.methods and storefs.exists(cfg.relevance, so):
        relevance = load_relevance(cfg.relevance, so)
    refine = tuple((src.attrs.get("inputs") or {}).get("refine") or NO_REFINE)
    models = Models(generator, clip, clip_ref.preprocessing, e4e, mapper, relevance, refine)

    metrics: dict[str, Any] = {"edits": {}, "targets": {k: list(v) for k, v in TARGETS.items()}}
    marks: dict[str, dict[str, str]] = {}
    for n, st in stores.items():
        if st.attrs.get("stage") != "edit" or st.n_rows != src.n_rows:
            raise WorldEvaluateError(f"{st.url}: not an edit of {cfg.store}")
        ok = np.intersect1d(np.intersect1d(st.ok_rows(), src.ok_rows()), c_store.ok_rows())
        if len(ok) == 0:
            log(f"world evaluate {n}: no edited rows, skipped")
            continue
        rows, where = held_out_rows(cfg.mapper, cfg.store, ok, cfg.n_rows, cfg.seed, so)
        try:
            world, scenes = scenes_for_ids(cfg.labels, [str(ids[r]) for r in rows])
        except (KeyError, FileNotFoundError) as exc:
            raise WorldEvaluateError(f"{cfg.store} rows are not world rows: {exc}") from None
        s = src.read("s", rows=rows).astype(np.float32)
        s_edit = st.read("s", rows=rows).astype(np.float32)
        c = c_store.read("embed", rows=rows).astype(np.float32)
        rep = evaluate_one(n, st.attrs, rows, s, s_edit, c, scenes, world, models, layout, cfg)
        rep["rows"] = where
        metrics["edits"][n] = rep
        if rep["status"] != "ok":
            log(f"world evaluate {n}: unscorable ({rep['reason']})")
            continue
        # ground truth for every edited row: the gallery's extra column
        _, all_scenes = scenes_for_ids(cfg.labels, [str(ids[r]) for r in ok])
        truth = truth_images_for(all_scenes, rep["attribute"], rep["value"], world)
        write_truth(cfg.truth_dir, n, ok, truth, so)
        marks[n] = row_marks([str(ids[r]) for r in ok], all_scenes, rep["attribute"], rep["value"])
        e = rep["methods"]["edit"]
        log(
            f"world evaluate {n} ({rep['attribute']} -> {rep['value']}): target "
            f"{_f(e.get('target_reached'))}, others kept {_f(e.get('all_others_kept'))}, "
            f"PSNR {_f(e.get('psnr_vs_counterfactual'))} dB, drift "
            f"{_f(e.get('centroid_drift_px'))} px on {e.get('n_scored')} {where} rows"
        )
    metrics["families"] = by_family(metrics["edits"])
    try:
        _, world_scenes, world_rows = load_labels(cfg.labels)
    except FileNotFoundError as exc:
        raise WorldEvaluateError(str(exc)) from None
    by_id = {str(r["id"]): sc for r, sc in zip(world_rows, world_scenes, strict=True)}
    labels = {str(i): row_caption(by_id[str(i)]) for i in ids if str(i) in by_id}
    write_row_files(cfg.truth_dir, labels, marks, so)
    out = storefs.join(cfg.out, "metrics.json")
    storefs.write_text_atomic(out, json.dumps(metrics, indent=2, sort_keys=True), so)
    log(
        f"world evaluate: {len(metrics['edits'])} edits in {time.perf_counter() - t0:.1f} s -> "
        f"{out}, ground truth in {cfg.truth_dir}"
    )
    return metrics


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def family_table(families: dict[str, dict], methods: Sequence[str] = METHODS) -> str:
    """A plain-text table: family x method -> target / others / PSNR / drift."""
    head = f"{'family':<11}{'method':<22}{'target':>8}{'others':>8}{'PSNR':>8}{'drift':>8}"
    lines = [head, "-" * len(head)]
    for fam in FAMILIES:
        f = families.get(fam, {})
        for m in methods:
            if m not in f:
                continue
            x = f[m]
            lines.append(
                f"{fam:<11}{m:<22}{_f(x.get('target_reached')):>8}"
                f"{_f(x.get('all_others_kept')):>8}{_f(x.get('psnr_vs_counterfactual')):>8}"
                f"{_f(x.get('centroid_drift_px')):>8}"
            )
    return "\n".join(lines)


__all__ = [
    "FAMILIES",
    "METHODS",
    "WorldEvaluateConfig",
    "WorldEvaluateError",
    "family_table",
    "prompt_to_target",
    "run",
]
