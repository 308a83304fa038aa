"""Evaluate stage: how well each edit did, on held-out rows, written for `dvc metrics`.

Per edit, on the mapper's held-out rows (the train stage's seeded split, rebuilt from
the split parameters recorded in the mapper config) or else a seeded sample:

- directional_similarity: mean cos(normalize(CLIP(x')) - normalize(CLIP(x)), delta_t)
  with x = G(s), x' = G(s') and delta_t = sum_k sign(alpha_k) * delta_t_k;
- target_similarity_before / _after: mean cos(CLIP(x), t_target) (averaged over targets);
- pixel_change: mean |x' - x| (pixels in [0, 1]);
- channels_changed: fraction of S channels that moved (|s' - s| > 1e-6);
- the mapper's held-out cosine from the train metrics file if present.

Writes `<out>/metrics.json`, `<out>/plots/directional_similarity.{csv,json}` (one row per
edit: base name, alpha, score) and `<out>/directional_similarity.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common import ClipRef, ExecutionConfig, GeneratorRef, resolve_device
from stages.config import require
from store import fs as storefs


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate:` in params."""

    edits: tuple[str, ...] = ()  # empty = every edit in edits_dir
    edits_dir: str = "data/edits"
    store: str = "data/images"  # the dataset the edits were made from
    mapper: str = "data/mapper.safetensors"  # its config records the held-out split
    train_metrics: str = "data/metrics/train/metrics.json"
    n_rows: int = 32  # held-out rows scored per edit (at most)
    seed: int = 0  # the sample when no held-out split is recorded
    out: str = "data/metrics/edit"

    def validate(self) -> None:
        from stages.edit import check_name

        for i, name in enumerate(self.edits):
            check_name(name, f"edits[{i}]")
        require(self.n_rows >= 1, "n_rows", self.n_rows, "an integer >= 1")


class EvaluateError(ValueError):
    """Bad evaluate input (no edits, another CLIP ...): one line."""


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def directional_similarity(
    e_before: torch.Tensor, e_after: torch.Tensor, delta_t: torch.Tensor
) -> torch.Tensor:
    """Per row cos(normalize(e_after) - normalize(e_before), delta_t) [B]."""
    d = _normalize(e_after.float()) - _normalize(e_before.float())
    return (_normalize(d) * _normalize(delta_t.float())).sum(-1)


def held_out_rows(
    mapper_path: str,
    store_root: str,
    ok: np.ndarray,
    n: int,
    seed: int,
    storage_options: dict | None = None,
) -> tuple[np.ndarray, str]:
    """Rows to score and where they came from ("train held-out" or "seeded sample")."""
    rows, source = _train_split(mapper_path, store_root, storage_options), "train held-out"
    if rows is not None:
        rows = np.intersect1d(rows, ok)
    if rows is None or len(rows) == 0:
        rows, source = ok, "seeded sample"
    rng = np.random.default_rng(seed)
    if len(rows) > n:
        rows = np.sort(rng.choice(rows, size=n, replace=False))
    return rows, source


def _json_or_none(url: str, storage_options: dict | None = None) -> dict | None:
    """The JSON object at a path or URL; None when missing or not valid JSON."""
    try:
        if not storefs.exists(url, storage_options):
            return None
        data = json.loads(storefs.read_text(url, storage_options))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _sidecar(path: str) -> str:
    """The .json beside a checkpoint (path or URL)."""
    return path.rsplit(".", 1)[0] + ".json" if "." in storefs.name(path) else path + ".json"


def _train_split(
    mapper_path: str, store_root: str, storage_options: dict | None = None
) -> np.ndarray | None:
    """The held-out rows of `store_root` in the split the mapper was trained with."""
    side = _json_or_none(_sidecar(mapper_path), storage_options)
    if side is None:
        return None
    try:
        train = side.get("train") or {}
        stores = [str(s).rstrip("/") for s in train.get("stores", [])]
        if store_root.rstrip("/") not in stores:
            return None
        from stages.train import TrainConfig, open_dataset

        keys = ("stores", "seed", "holdout_fraction")
        kw = {k: (tuple(train[k]) if k == "stores" else train[k]) for k in keys if k in train}
        data = open_dataset(TrainConfig(**kw), storage_options)
        return np.asarray(data.held_out[stores.index(store_root.rstrip("/"))], dtype=np.int64)
    except Exception:  # an old or foreign config: fall back to a seeded sample
        return None


def mapper_heldout_cos(
    train_metrics: str, mapper_path: str, storage_options: dict | None = None
) -> float | None:
    """The trainer's last held-out cosine (metrics file, else the mapper config)."""
    cands: list[dict] = []
    metrics = _json_or_none(train_metrics, storage_options)
    if metrics is not None:
        cands.append(metrics)
    side = _json_or_none(_sidecar(mapper_path), storage_options)
    if side is not None:
        cands.append(side.get("metrics") or {})
    for d in cands:
        v = _find_cos(d)
        if v is not None:
            return v
    return None


def _find_cos(d: Any, depth: int = 0) -> float | None:
    if not isinstance(d, dict) or depth > 3:
        return None
    for key in ("val_cos", "heldout_cos", "cos"):
        v = d.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    for key in ("val", "heldout", "held_out", "metrics"):
        v = _find_cos(d.get(key), depth + 1)
        if v is not None:
            return v
    return None


@torch.no_grad()
def score_edit(
    generator: Any,
    clip: Any,
    s: np.ndarray,
    s_edit: np.ndarray,
    attrs: dict,
    preprocessing: str,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, float]:
    """The metrics of one edit on rows s [n, D] -> s_edit [n, D]."""
    from stages.render import to_uint8

    dts = [torch.tensor(d, dtype=torch.float32) for d in attrs["delta_t"]]
    alphas = attrs["alphas"]
    delta_t = sum(math.copysign(1.0, a) * d for a, d in zip(alphas, dts, strict=True))
    texts = clip.encode_text(list(attrs["targets"]), templates=tuple(attrs["templates"]))
    texts = _normalize(texts.float().cpu())
    dirs, before, after, pix = [], [], [], []
    for i in range(0, len(s), batch_size):
        a = torch.as_tensor(s[i : i + batch_size], device=device)
        b = torch.as_tensor(s_edit[i : i + batch_size], device=device)
        xa = generator.synthesize(a, noise_mode="const").clamp(-1, 1)
        xb = generator.synthesize(b, noise_mode="const").clamp(-1, 1)
        ea = clip.encode_images(xa, preprocessing=preprocessing).float().cpu()
        eb = clip.encode_images(xb, preprocessing=preprocessing).float().cpu()
        dirs.append(directional_similarity(ea, eb, delta_t))
        before.append(_normalize(ea) @ texts.T)
        after.append(_normalize(eb) @ texts.T)
        ua, ub = to_uint8(xa).astype(np.float32), to_uint8(xb).astype(np.float32)
        pix.append(np.abs(ub - ua).mean(axis=(1, 2, 3)) / 255.0)
    changed = (np.abs(s_edit - s) > 1e-6).mean(axis=1)
    return {
        "directional_similarity": float(torch.cat(dirs).mean()),
        "target_similarity_before": float(torch.cat(before).mean()),
        "target_similarity_after": float(torch.cat(after).mean()),
        "pixel_change": float(np.concatenate(pix).mean()),
        "channels_changed": float(changed.mean()),
    }


def sweep_alpha(attrs: dict) -> float:
    """x of the alpha plot: the sweep value, else the first target's alpha."""
    if attrs.get("sweep") is not None:
        return float(attrs["sweep"])
    return float(attrs["alphas"][0])


def run(
    cfg: EvaluateConfig,
    generator_ref: GeneratorRef | None = None,
    clip_ref: ClipRef | None = None,
    execution: ExecutionConfig | None = None,
    *,
    generator: Any | None = None,
    clip: Any | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Score every chosen edit; write metrics.json and the alpha plot; return the metrics."""
    from stages.edit import dataset_urls
    from stages.execution import load_clip_ref, load_generator_ref
    from stages.render import discover_edits
    from store import RowStore

    clip_ref = clip_ref or ClipRef()
    execution = execution or ExecutionConfig()
    device = resolve_device(execution.device)
    so = execution.storage()
    storefs.check_reachable(cfg.out, so)
    names = list(cfg.edits) or discover_edits(cfg.edits_dir, so)
    if not names:
        raise EvaluateError(f"no edits in {cfg.edits_dir} (run `deltaedit edit` first)")
    stores = {
        n: RowStore.open(storefs.join(cfg.edits_dir, f"{n}.zarr"), storage_options=so)
        for n in names
    }
    src = RowStore.open(dataset_urls(cfg.store)["s"], storage_options=so)
    generator = generator or load_generator_ref(generator_ref or GeneratorRef(), device)
    clip = clip or load_clip_ref(clip_ref, device)
    recorded = src.attrs.get("generator")
    if isinstance(recorded, str) and recorded != generator.fingerprint:
        raise EvaluateError(
            f"{src.url} was made with generator {recorded[:12]}, params name "
            f"{generator.fingerprint[:12]}; set generator: to the one that made the store"
        )
    for n, st in stores.items():
        a = st.attrs
        if a.get("stage") != "edit":
            raise EvaluateError(f"{st.url}: not an edit store")
        if st.n_rows != src.n_rows:
            raise EvaluateError(f"edit {n} has {st.n_rows} rows, {src.url} {src.n_rows}")
        if a.get("clip") != clip.fingerprint:
            raise EvaluateError(
                f"edit {n} was made with CLIP {str(a.get('clip'))[:12]}, params name "
                f"{clip.fingerprint[:12]}; evaluate with the edit's CLIP"
            )
    heldout_cos = mapper_heldout_cos(cfg.train_metrics, cfg.mapper, so)
    out = cfg.out
    metrics: dict[str, Any] = {"edits": {}, "mapper": {"heldout_cos": heldout_cos}}
    for n, st in stores.items():
        ok = np.intersect1d(st.ok_rows(), src.ok_rows())
        if len(ok) == 0:
            log(f"evaluate {n}: no edited rows, skipped")
            continue
        rows, where = held_out_rows(cfg.mapper, cfg.store, ok, cfg.n_rows, cfg.seed, so)
        s = src.read("s", rows=rows).astype(np.float32)
        s_edit = st.read("s", rows=rows).astype(np.float32)
        m = score_edit(
            generator,
            clip,
            s,
            s_edit,
            st.attrs,
            clip_ref.preprocessing,
            execution.batch_size,
            device,
        )
        m |= {"n_rows": int(len(rows)), "rows": where, "alpha": sweep_alpha(st.attrs)}
        m["base_name"] = st.attrs.get("base_name", n)
        metrics["edits"][n] = m
        log(
            f"evaluate {n}: directional {m['directional_similarity']:.3f}, target sim "
            f"{m['target_similarity_before']:.3f} -> {m['target_similarity_after']:.3f}, "
            f"pixel change {m['pixel_change']:.3f}, channels changed "
            f"{m['channels_changed']:.2%} on {len(rows)} {where} rows"
        )
    metrics_json = json.dumps(metrics, indent=2, sort_keys=True)
    storefs.write_text_atomic(storefs.join(out, "metrics.json"), metrics_json, so)
    write_alpha_plot(out, metrics["edits"], so)
    return metrics


def write_alpha_plot(
    out: str | Path, edits: dict[str, dict], storage_options: dict | None = None
) -> None:
    """plots/directional_similarity.{csv,json} and directional_similarity.png."""
    rows = sorted(
        (
            {
                "edit": n,
                "base": m["base_name"],
                "alpha": m["alpha"],
                "directional_similarity": m["directional_similarity"],
            }
            for n, m in edits.items()
        ),
        key=lambda r: (r["base"], r["alpha"]),
    )
    out, so = str(out), storage_options
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, ["edit", "base", "alpha", "directional_similarity"])
    w.writeheader()
    w.writerows(rows)
    plots = storefs.join(out, "plots")
    storefs.write_text_atomic(
        storefs.join(plots, "directional_similarity.csv"), table.getvalue(), so
    )
    storefs.write_text_atomic(
        storefs.join(plots, "directional_similarity.json"), json.dumps(rows, indent=2), so
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for base in sorted({r["base"] for r in rows}):
        pts = [r for r in rows if r["base"] == base]
        ax.plot(
            [p["alpha"] for p in pts], [p["directional_similarity"] for p in pts], "o-", label=base
        )
    ax.set_xlabel("alpha")
    ax.set_ylabel("CLIP directional similarity")
    ax.axhline(0, color="#999", lw=0.5)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storefs.write_bytes_atomic(storefs.join(out, "directional_similarity.png"), png.getvalue(), so)
