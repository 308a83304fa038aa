"""Edit stage: a prompt turned into S deltas over cached latents (no image is encoded).

DeltaEdit inference (paper + official code), with the strength alpha added:

    delta_t = normalize(t_target) - normalize(t_neutral)        (template averages, [E])
    keep_k  = |relevance_k . delta_t| >= beta                   (unnormalized delta_t; beta 0 = all)
    delta_s = mapper(s_conv, [normalize(c) || normalize(delta_t)])   ([B, Dconv])
    (edit.antisymmetric: delta_s = (mapper(.., d) - mapper(.., -d)) / 2 + the edit's
     mean_pull share of the even part, see mapped_delta)
    s'_conv = s_conv + alpha * keep * level_mask * delta_s      (toRGB styles unchanged)

Several targets in one edit add up: sum_k alpha_k * keep_k * delta_s_k. The
`global-direction` method (StyleCLIP) needs no mapper:
delta_s_k = alpha * s_std_k * r_k / max|r| with r = relevance . delta_t, beta-masked.

The math lives in small pure functions on tensors; `run()` wires them to the
stores: it reads s and c rows block by block and writes `edits/<name>.zarr`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from model.layout import LEVELS, SLayout
from stages.common import (
    ClipRef,
    ExecutionConfig,
    autocast,
    release_freed_memory,
    resolve_device,
    to_device,
)
from stages.config import ConfigError, require
from stages.execution import Staged
from store import FLOAT_DTYPES
from store import fs as storefs
from store.fs import absolute

Method = Literal["mapper", "global-direction"]
NEUTRAL_BY_KIND = {"faces": "face", "cats": "cat", "shapes": "shape"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALPHA_LIMIT = 10.0


# --- pure math on tensors -----------------------------------------------------------


def normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def text_delta(t_target: torch.Tensor, t_neutral: torch.Tensor) -> torch.Tensor:
    """delta_t [E] = normalize(t_target) - normalize(t_neutral) (left unnormalized)."""
    return normalize(t_target.float()) - normalize(t_neutral.float())


def beta_mask(relevance: torch.Tensor | None, delta_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Channels kept [Dconv] bool: |relevance [Dconv, E] . delta_t [E]| >= beta.

    beta 0 keeps every channel (no relevance needed). delta_t is used as given
    (the official code thresholds the unnormalized difference).
    """
    if beta <= 0:
        if relevance is None:
            raise ValueError("beta_mask: beta 0 needs the relevance only for its size")
        return torch.ones(relevance.shape[0], dtype=torch.bool, device=relevance.device)
    if relevance is None:
        raise ValueError("beta > 0 needs the relevance directions (run `deltaedit relevance`)")
    r = relevance.float() @ delta_t.float().to(relevance.device)  # [Dconv]
    return r.abs() >= beta


def level_mask(layout: SLayout, levels: Sequence[str]) -> torch.Tensor:
    """Conv channels [Dconv] bool that belong to the chosen levels (coarse/medium/fine)."""
    mask = torch.zeros(layout.conv_dim, dtype=torch.bool)
    for level, sl in layout.level_slices().items():
        if level in levels:
            mask[sl] = True
    return mask


def mapper_condition(c: torch.Tensor, delta_t: torch.Tensor, chord: float = 0.0) -> torch.Tensor:
    """Mapper condition [B, 2E] = [normalize(c) || d] for image embeddings c [B, E].

    chord 0: d = normalize(delta_t), the same for every row (the official inference).
    chord > 0: d = normalize(c_t - normalize(c)) with c_t = normalize(normalize(c) + chord *
    normalize(delta_t)), the chord of the unit sphere from each row's embedding to the one the
    text delta points at. The mapper was trained on such chords between image embeddings,
    whose direction also says how far the partner is (a chord's angle to the sphere grows
    with its length); the bare text direction, not tangent at c, reads to it as a far partner.
    """
    c_hat = normalize(c.float())
    d_hat = normalize(delta_t.float().to(c.device)).expand_as(c_hat)
    if chord > 0:
        d_hat = normalize(normalize(c_hat + chord * d_hat) - c_hat)
    return torch.cat([c_hat, d_hat], dim=1)


@dataclass
class TargetDelta:
    """One target of an edit: its text delta, strength and channel mask [Dconv]."""

    prompt: str
    delta_t: torch.Tensor  # [E], unnormalized
    alpha: float
    mask: torch.Tensor  # [Dconv] bool: beta mask & level mask
    # share of the direction-free part kept (mapped_delta): 1 = the plain mapper output,
    # 0 = antisymmetric
    mean_pull: float = 1.0
    chord: float = 0.0  # the text delta as a chord from each row's embedding (mapper_condition)

    def scale(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """alpha * mask [Dconv] on device (None when it is all ones: nothing to multiply)."""
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_scale", {})
        if key not in cache:
            if self.alpha == 1.0 and bool(self.mask.all()):
                cache[key] = None
            else:
                cache[key] = (self.alpha * self.mask.to(torch.float64)).to(device, dtype)
        return cache[key]


def mapped_delta(
    mapper: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s_conv: torch.Tensor,
    cond: torch.Tensor,
    mean_pull: float = 1.0,
    flipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """(M(d) - M(-d)) / 2 + mean_pull * (M(d) + M(-d)) / 2 [B, Dconv], M(d) =
    mapper(s, [c || d]): mean_pull 1 is the plain output M(d) (one pass, the official
    inference), 0 the antisymmetric form (edit.antisymmetric).

    A mapper trained on random pairs learns E[delta_s | s, c, d], which holds a part that
    does not turn with the direction d: a random partner is on average more typical than
    the source, so every predicted delta also pulls s toward the dataset mean (shapes
    drift to the centre, other attributes fade). The difference of the two opposite
    directions keeps the part that is odd in d and cancels that pull; `mean_pull` keeps
    that share of the even part. `flipped` is the condition of -d (None: cond with its
    second half negated; a chord condition passes its own, mapper_condition of -delta_t).
    """
    if mean_pull == 1.0:
        return mapper(s_conv, cond)
    if flipped is None:
        e = cond.shape[1] // 2
        flipped = torch.cat([cond[:, :e], -cond[:, e:]], dim=1)
    # (a - b) / 2 + k (a + b) / 2 = ((1 + k) a - (1 - k) b) / 2
    return mapper(s_conv, cond) * (0.5 + 0.5 * mean_pull) - mapper(s_conv, flipped) * (
        0.5 - 0.5 * mean_pull
    )


def mapper_delta(
    mapper: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s_conv: torch.Tensor,
    c: torch.Tensor,
    targets: Sequence[TargetDelta],
) -> torch.Tensor:
    """delta_s_conv [B, Dconv] = sum_k alpha_k * mask_k * mapped_delta(.., cond_k) with each
    target's mean_pull (1 = the plain mapper(s_conv, cond_k))."""
    total = None
    for t in targets:
        cond = mapper_condition(c, t.delta_t, t.chord)
        flipped = None
        if t.chord > 0 and t.mean_pull != 1.0:
            flipped = mapper_condition(c, -t.delta_t, t.chord)
        d = mapped_delta(mapper, s_conv, cond, t.mean_pull, flipped).float()  # summed in fp32
        scale = t.scale(d.device, d.dtype)
        if total is None:
            total = d if scale is None else d * scale
        elif scale is None:
            total += d
        else:
            total.addcmul_(d, scale)
    return torch.zeros_like(s_conv) if total is None else total


def global_direction_delta(
    relevance: torch.Tensor, s_std_conv: torch.Tensor, targets: Sequence[TargetDelta]
) -> torch.Tensor:
    """StyleCLIP global direction [Dconv]: sum_k alpha_k * s_std * r_k / max|r_k| (masked).

    r_k = relevance . delta_t_k. Scaling by the largest kept |r| makes alpha mean
    "the most relevant channel moves alpha standard deviations".
    """
    total = torch.zeros(relevance.shape[0], dtype=torch.float32, device=relevance.device)
    for t in targets:
        mask = t.mask.to(relevance.device)
        r = (relevance.float() @ t.delta_t.float().to(relevance.device)) * mask
        peak = r.abs().max()
        if peak > 0:
            total += t.alpha * s_std_conv.float().to(relevance.device) * r / peak
    return total


def apply_delta(
    s: torch.Tensor, delta_conv: torch.Tensor, conv_index: torch.Tensor
) -> torch.Tensor:
    """s' [B, D]: s with delta_conv ([B, Dconv] or [Dconv]) added on the conv channels only."""
    out = s.clone()
    out[:, conv_index] += delta_conv.to(s.dtype)
    return out


# --- config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EditSpec:
    """One edit: `target` (one prompt or several composed), strength(s), mask, levels.

    `alphas` runs a sweep: one edit per value, named `<name>_a<value>`, each
    target's alpha multiplied by the value. `mean_pull` (with edit.antisymmetric):
    the share of the mapper's direction-free part kept, see mapped_delta.
    """

    name: str
    target: str | tuple[str, ...]
    neutral: str | None = None  # None = edit.dataset_kind's neutral word
    alpha: float | tuple[float, ...] = 1.0
    beta: float = 0.03
    levels: tuple[str, ...] = LEVELS
    alphas: tuple[float, ...] = ()
    mean_pull: float = 0.0

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,) if isinstance(self.target, str) else tuple(self.target)

    @property
    def target_alphas(self) -> tuple[float, ...]:
        if isinstance(self.alpha, (int, float)):
            return (float(self.alpha),) * len(self.targets)
        return tuple(float(a) for a in self.alpha)

    def check(self, key: str = "edit") -> None:
        """Raise ConfigError naming `key.field` for a bad value (EditConfig.validate calls it
        with key `edits[i]`)."""
        check_name(self.name, f"{key}.name")
        require(len(self.targets) >= 1, f"{key}.target", self.target, "a prompt or a list")
        for p in self.targets:
            check_prompt(p, f"{key}.target")
        if self.neutral is not None:
            check_prompt(self.neutral, f"{key}.neutral")
        require(
            len(self.target_alphas) == len(self.targets),
            f"{key}.alpha",
            self.alpha,
            f"one number or a list of {len(self.targets)} (one per target)",
        )
        for a in self.target_alphas:
            check_alpha(a, f"{key}.alpha")
        for a in self.alphas:
            check_alpha(a, f"{key}.alphas")
            for base in self.target_alphas:
                check_alpha(a * base, f"{key}.alphas (x alpha)")
        check_beta(self.beta, f"{key}.beta")
        check_mean_pull(self.mean_pull, f"{key}.mean_pull")
        require(
            len(self.levels) > 0 and all(lv in LEVELS for lv in self.levels),
            f"{key}.levels",
            list(self.levels),
            "a non-empty subset of coarse, medium, fine",
        )

    def expand(self) -> list[ResolvedEdit]:
        """One resolved edit, or one per sweep value."""
        sweep = self.alphas or (None,)
        out = []
        for v in sweep:
            scale = 1.0 if v is None else float(v)
            name = self.name if v is None else f"{self.name}_a{v:g}"
            check_name(name, "edit.name")
            out.append(
                ResolvedEdit(
                    name=name,
                    base_name=self.name,
                    sweep=v,
                    targets=self.targets,
                    alphas=tuple(a * scale for a in self.target_alphas),
                    neutral=self.neutral,
                    beta=self.beta,
                    levels=tuple(self.levels),
                    mean_pull=float(self.mean_pull),
                )
            )
        return out


@dataclass(frozen=True)
class ResolvedEdit:
    name: str
    base_name: str
    sweep: float | None
    targets: tuple[str, ...]
    alphas: tuple[float, ...]
    neutral: str | None
    beta: float
    levels: tuple[str, ...]
    mean_pull: float = 1.0  # the form applied: 1 = plain, below 1 = antisymmetric (resolved)
    chord: float = 0.0  # edit.chord (resolved)


@dataclass(frozen=True)
class Selection:
    """Which rows to edit: all ok rows, given ids, a [start, stop) range, or a random sample."""

    ids: tuple[str, ...] = ()
    range: tuple[int, ...] = ()  # (start, stop)
    sample: int | None = None
    seed: int = 0

    def validate(self, key: str = "edit.select") -> None:
        given = sum([bool(self.ids), bool(self.range), self.sample is not None])
        require(given <= 1, key, "several", "at most one of ids, range, sample")
        if self.range:
            require(
                len(self.range) == 2 and 0 <= self.range[0] < self.range[1],
                f"{key}.range",
                list(self.range),
                "[start, stop) with 0 <= start < stop",
            )
        if self.sample is not None:
            require(self.sample >= 1, f"{key}.sample", self.sample, "an integer >= 1")


@dataclass(frozen=True)
class EditConfig:
    """`edit:` in params."""

    edits: tuple[EditSpec, ...] = ()
    dataset_kind: Literal["faces", "cats", "shapes"] = "shapes"
    method: Method = "mapper"
    store: str = "data/images"  # a dataset root holding s.zarr and clip.zarr (+ manifest.zarr)
    mapper: str = "data/mapper.safetensors"
    relevance: str = "data/relevance.zarr"
    out_dir: str = "data/edits"
    templates: tuple[str, ...] = ("{}",)
    select: Selection = field(default_factory=Selection)
    # mapper method: delta_s = (M(s, [c, d]) - M(s, [c, -d])) / 2 (see mapped_delta);
    # false = the mapper's output as is (the official DeltaEdit inference)
    antisymmetric: bool = False
    # mapper method: 0 = the text delta is the mapper's direction for every row (official);
    # > 0 = each row gets the chord from its embedding c toward normalize(c + chord * delta_t),
    # the kind of image delta the mapper was trained on (mapper_condition)
    chord: float = 0.0
    dtype: str = "float32"  # how edits store s': float32 | float16 | bfloat16 (half the bytes)
    # remove the stores this stage wrote under out_dir for edits no longer listed (a
    # persisted out_dir then holds what a from-scratch run makes); `--target` turns it off
    prune: bool = True

    def validate(self) -> None:
        require(self.dtype in FLOAT_DTYPES, "dtype", self.dtype, " | ".join(FLOAT_DTYPES))
        ok = isinstance(self.chord, (int, float)) and math.isfinite(self.chord)
        require(
            ok and 0 <= self.chord <= ALPHA_LIMIT,
            "chord",
            self.chord,
            f"a number in [0, {ALPHA_LIMIT:g}] (0 = the text direction as is)",
        )
        if self.chord > 0:
            require(self.method == "mapper", "chord", self.chord, "0 unless edit.method is mapper")
        names: set[str] = set()
        for i, spec in enumerate(self.edits):
            spec.check(f"edits[{i}]")
            if spec.mean_pull != 0.0:  # only the antisymmetric form has a part to keep
                require(
                    self.antisymmetric,
                    f"edits[{i}].mean_pull",
                    spec.mean_pull,
                    "0 unless edit.antisymmetric is true (the plain output keeps all of it)",
                )
            for r in spec.expand():
                require(r.name not in names, f"edits[{i}].name", r.name, "a unique edit name")
                names.add(r.name)
        require(len(self.templates) >= 1, "templates", list(self.templates), "a non-empty list")
        for t in self.templates:
            require("{}" in t, "templates", t, "templates containing {} for the prompt")
        self.select.validate()

    def neutral_for(self, edit: ResolvedEdit) -> str:
        return edit.neutral if edit.neutral is not None else NEUTRAL_BY_KIND[self.dataset_kind]

    def resolved(self) -> list[ResolvedEdit]:
        """The edits to run, each with the mapper form it applies: its mean_pull with
        edit.antisymmetric, 1 (the plain output) without."""
        return [
            replace(
                r, chord=float(self.chord), **({} if self.antisymmetric else {"mean_pull": 1.0})
            )
            for spec in self.edits
            for r in spec.expand()
        ]


def check_name(name: str, key: str) -> None:
    require(
        isinstance(name, str) and bool(NAME_RE.match(name)) and ".." not in name,
        key,
        name,
        "a plain file name (letters, digits, . _ -; no path separators, no '..', not absolute)",
    )


def check_prompt(prompt: str, key: str) -> None:
    require(isinstance(prompt, str) and prompt.strip() != "", key, prompt, "a non-empty prompt")


def check_alpha(alpha: float, key: str) -> None:
    ok = isinstance(alpha, (int, float)) and math.isfinite(alpha) and abs(alpha) <= ALPHA_LIMIT
    require(ok, key, alpha, f"a finite number in [-{ALPHA_LIMIT:g}, {ALPHA_LIMIT:g}]")


def check_mean_pull(mean_pull: float, key: str) -> None:
    ok = isinstance(mean_pull, (int, float)) and 0 <= mean_pull <= 1
    require(ok, key, mean_pull, "a number in [0, 1]")


def check_beta(beta: float, key: str) -> None:
    ok = isinstance(beta, (int, float)) and math.isfinite(beta) and 0 <= beta < 1
    require(ok, key, beta, "a number in [0, 1)")


# --- wiring to stores and models ----------------------------------------------------


class EditError(ValueError):
    """Bad input found before any work (mismatched mapper, missing store ...): one line."""


@dataclass
class EditResult:
    name: str
    url: str
    n_edited: int
    n_skipped: int
    seconds: float


def dataset_urls(root: str) -> dict[str, str]:
    from store import store_url

    return {k: store_url(root, k) for k in ("manifest", "clip", "s")}


def select_rows(cfg: Selection, ok: np.ndarray, n_rows: int, ids: np.ndarray | None) -> np.ndarray:
    """Rows to edit (sorted int64), a subset of the ok rows."""
    ok = np.asarray(ok, dtype=np.int64)
    if cfg.ids:
        if ids is None:
            raise EditError("edit.select.ids needs manifest.zarr beside s.zarr to look ids up")
        lookup = {str(v): i for i, v in enumerate(ids)}
        missing = [i for i in cfg.ids if i not in lookup]
        if missing:
            raise EditError(f"edit.select.ids: unknown ids {missing[:5]} (not in the manifest)")
        chosen = np.array(sorted(lookup[i] for i in cfg.ids), dtype=np.int64)
        return np.intersect1d(chosen, ok)
    if cfg.range:
        start, stop = cfg.range
        if start >= n_rows:
            raise EditError(f"edit.select.range: start {start} >= number of rows {n_rows}")
        return ok[(ok >= start) & (ok < stop)]
    if cfg.sample is not None:
        rng = np.random.default_rng(cfg.seed)
        k = min(cfg.sample, len(ok))
        return np.sort(rng.choice(ok, size=k, replace=False))
    return ok


def encode_prompt(clip: Any, prompt: str, templates: Sequence[str]) -> torch.Tensor:
    """Template-averaged, normalized text embedding [E]; a truncation warning is re-raised
    as a visible warning that names the prompt."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = clip.encode_text([prompt], templates=tuple(templates))[0]
    for w in caught:
        msg = str(w.message)
        if "trunc" in msg.lower():
            warnings.warn(f"prompt {prompt[:40]!r}...: {msg}", UserWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return t.detach().float().cpu()


def prepare_targets(
    edit: ResolvedEdit,
    neutral: str,
    clip: Any,
    templates: Sequence[str],
    relevance: torch.Tensor | None,
    layout: SLayout,
    work: SLayout | None = None,
) -> list[TargetDelta]:
    """Targets with masks over the channels the edit moves: `work`'s conv channels
    (the mapper's `s_layout`; None = `layout`, the conv channels).

    The relevance covers the conv channels only: with a mapper of channels "all" the
    beta mask applies to the conv channels and the toRGB channels are always kept.
    """
    work = layout if work is None else work
    t_neutral = encode_prompt(clip, neutral, templates)
    lv = level_mask(work, edit.levels)
    conv_pos = None
    if work is not layout:  # positions of the store's conv channels in work's channels
        conv_pos = torch.from_numpy(np.flatnonzero(np.isin(work.conv_index(), layout.conv_index())))
    out = []
    for prompt, alpha in zip(edit.targets, edit.alphas, strict=True):
        dt = text_delta(encode_prompt(clip, prompt, templates), t_neutral)
        keep = torch.ones(work.conv_dim, dtype=torch.bool)
        if edit.beta > 0:
            conv_keep = beta_mask(relevance, dt, edit.beta).cpu()
            if conv_pos is None:
                keep = conv_keep
            else:
                keep[conv_pos] = conv_keep
        out.append(TargetDelta(prompt, dt, float(alpha), keep & lv, edit.mean_pull, edit.chord))
    return out


@dataclass
class Relevance:
    directions: torch.Tensor  # [Dconv, E]
    s_mean: np.ndarray  # [D]
    s_std: np.ndarray  # [D]
    attrs: dict


def load_relevance(url: str, storage_options: dict | None = None) -> Relevance:
    from stages.relevance import read_relevance
    from store import StoreError

    try:
        return read_relevance(url, storage_options)
    except StoreError as exc:
        raise EditError(
            f"the beta mask (beta > 0) and the global-direction method need the relevance "
            f"(`deltaedit relevance`): {exc}".replace("\n", " ")
        ) from None


def edit_fingerprint(attrs: dict) -> str:
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()


def check_mapper(
    mapper: Any,
    mapper_cfg: dict,
    layout: SLayout,
    clip: Any,
    c_attrs: dict,
    s_attrs: dict | None = None,
) -> None:
    """A mapper trained for another S layout, generator or CLIP model is an error before any
    work (`s_attrs`: the provenance of the s.zarr edited)."""
    trained = mapper_cfg.get("generator_fingerprint")
    encoded = (s_attrs or {}).get("generator")
    if isinstance(trained, str) and trained and isinstance(encoded, str) and encoded:
        if trained != encoded:
            raise EditError(
                f"mapper was trained on latents of generator {trained[:12]}, the store's s.zarr "
                f"was encoded with generator {encoded[:12]}; edit a store of the generator the "
                "mapper was trained on, or retrain with `deltaedit train` on this store"
            )
    m_layout = getattr(mapper, "layout", None)
    if m_layout is not None and m_layout.to_dict() != layout.to_dict():
        raise EditError(
            f"mapper was trained for another S layout (Dconv {m_layout.conv_dim}, D {m_layout.dim})"
            f" than the store's (Dconv {layout.conv_dim}, D {layout.dim}); retrain with "
            "`deltaedit train` on this store"
        )
    if getattr(mapper, "clip_dim", clip.embed_dim) != clip.embed_dim:
        raise EditError(
            f"mapper expects CLIP embeddings of size {mapper.clip_dim}, the CLIP model "
            f"{clip.name} gives {clip.embed_dim}"
        )
    want = _recorded_clip_fingerprint(mapper_cfg)
    if want is not None and want != clip.fingerprint:
        raise EditError(
            f"mapper was trained with CLIP {want[:12]}, the params name CLIP "
            f"{clip.fingerprint[:12]} ({clip.name}); use the CLIP it was trained with"
        )
    c_fp = c_attrs.get("fingerprint")
    if c_fp is not None and c_fp != clip.fingerprint:
        raise EditError(
            f"clip.zarr was encoded with CLIP {str(c_fp)[:12]}, the params name CLIP "
            f"{clip.fingerprint[:12]}; text and image embeddings must come from one model"
        )


def _recorded_clip_fingerprint(cfg: dict) -> str | None:
    for key in ("clip_fingerprint", "clip"):
        v = cfg.get(key)
        if isinstance(v, str) and len(v) >= 32:
            return v
        if isinstance(v, dict) and isinstance(v.get("fingerprint"), str):
            return v["fingerprint"]
    train = cfg.get("train")
    if isinstance(train, dict):
        return _recorded_clip_fingerprint(train)
    return None


@dataclass(frozen=True)
class _EditTask(Staged):
    """Edit one block of an edit's compute store: its row i is row `rows[i]` of the s and
    clip stores. Staged (read / compute / write): a Dask task on a cluster, the mapper
    loaded once per worker process; in-process run_blocks overlaps the steps of
    successive blocks."""

    s_url: str
    c_url: str
    targets: tuple[TargetDelta, ...]
    layout: SLayout  # the layout whose conv channels the delta covers
    mapper_url: str | None
    mapper_for: tuple[SLayout, int]  # (store layout, CLIP dim): what an official .pth is built for
    gd: torch.Tensor | None
    batch_size: int
    device: str  # as configured ('auto' resolves on the worker)
    storage_options: dict = field(default_factory=dict)
    model: Any = None  # the mapper the client loaded (local runs: no second load)
    out_url: str = ""  # the compute store
    rows: np.ndarray | None = None  # [n_compute] rows of the s / clip stores
    precision: str = "fp32"  # execution.precision: the mapper's compute dtype

    def _open(self, url: str) -> Any:
        from store import RowStore

        return RowStore.open(url, storage_options=self.storage_options)

    def read(self, block: int) -> tuple[np.ndarray | None, np.ndarray]:
        idx = self.rows[self._open(self.out_url).block_rows(block)]
        s_blk = self._open(self.s_url).read("s", rows=idx)
        if self.mapper_url is None:
            return None, s_blk
        return self._open(self.c_url).read("embed", rows=idx), s_blk

    def compute(self, block: int, data: tuple[np.ndarray | None, np.ndarray]) -> np.ndarray:
        c_blk, s_blk = data
        device = resolve_device(self.device)
        mapper = self.model
        if mapper is None and self.mapper_url is not None:
            from stages.execution import cached

            url, (lay, e), so = self.mapper_url, self.mapper_for, self.storage_options

            def load() -> Any:
                return _load_mapper(url, lay, e, so)[0].to(device).eval()

            mapper = cached(("mapper", url, device), load)
        return edit_rows(
            s_blk,
            c_blk,
            self.targets,
            self.layout,
            mapper,
            self.gd,
            self.batch_size,
            device,
            self.precision,
        )

    def write(self, block: int, s_new: np.ndarray) -> Any:
        from stages.execution import BlockReport, counts_of, mark_non_finite
        from store import Status

        t0 = time.perf_counter()
        status = np.full(len(s_new), int(Status.OK), dtype=np.uint8)
        mark_non_finite(status, [s_new])  # a mapper's NaN is a row status
        self._open(self.out_url).write_block(block, {"s": s_new}, status)
        return BlockReport(block, len(s_new), counts_of(status), (), time.perf_counter() - t0)


def run(
    cfg: EditConfig,
    execution: ExecutionConfig | None = None,
    clip_ref: ClipRef | None = None,
    *,
    clip: Any | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[EditResult]:
    """Run every edit in `cfg` over the selected ok rows of `cfg.store`."""
    from stages.execution import hold_outputs

    execution = execution or ExecutionConfig()
    urls = [edit_url(cfg, e) for e in cfg.resolved()]
    with hold_outputs(urls, "edit", execution, log):
        results = _edit(cfg, execution, clip_ref, clip, progress, log)
    if cfg.prune:
        prune_edits(cfg.out_dir, {e.name for e in cfg.resolved()}, execution.storage(), log)
    return results


PASS_SUFFIXES = (".zarr", ".zarr.next", ".zarr.compute", ".zarr.prev")  # a store + leftovers


def written_by_edit(url: str, storage_options: dict | None = None) -> str | None:
    """The edit name a store at `url` records when this stage wrote it (attrs stage
    "edit"), else None: anything else (another stage's store, a user's file) is not ours."""
    meta = storefs.join(url, "zarr.json")
    try:
        attrs = json.loads(storefs.read_text(meta, storage_options)).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(attrs, dict) or attrs.get("stage") != "edit":
        return None
    name = attrs.get("name")
    return name if isinstance(name, str) else None


def prune_edits(
    out_dir: str,
    keep: set[str],
    storage_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Remove the edit stores (and their update leftovers `.next`, `.compute`, `.prev`)
    under `out_dir` of edits not in `keep`: only stores whose attrs say this stage wrote
    them under that very name; a store some pass holds the lease of is kept (saying so).
    Returns the URLs removed."""
    from store.lease import lease_url

    removed = []
    for entry in storefs.listdir(out_dir, storage_options):
        suffix = next((x for x in PASS_SUFFIXES if entry.endswith(x)), None)
        if suffix is None or entry[: -len(suffix)] in keep:
            continue
        url = storefs.join(out_dir, entry)
        name = entry[: -len(suffix)]
        if written_by_edit(url, storage_options) != name:
            continue
        final = storefs.join(out_dir, f"{name}.zarr")
        if storefs.exists(lease_url(final), storage_options):
            log(f"edit: kept {url} (no longer in edit.edits, but a pass holds its lease)")
            continue
        storefs.remove(url, storage_options)
        removed.append(url)
        log(f"edit: removed {url} (no longer in edit.edits)")
    return removed


def edit_url(cfg: EditConfig, edit: Any) -> str:
    """Where an edit is written: `<edit.out_dir>/<name>.zarr`."""
    return f"{cfg.out_dir.rstrip('/')}/{edit.name}.zarr"


def _edit(
    cfg: EditConfig,
    execution: ExecutionConfig,
    clip_ref: ClipRef | None,
    clip: Any | None,
    progress: bool,
    log: Callable[[str], None],
) -> list[EditResult]:
    from stages.execution import PassSummary, run_blocks
    from stages.incremental import update_output
    from store import ArraySpec, RowStore, Status

    edits = cfg.resolved()
    if not edits:
        raise EditError("no edits: list them under edit.edits in params or pass --target")
    release_freed_memory()  # block-sized buffers come and go: give them back when freed
    device = resolve_device(execution.device)
    so = execution.storage()
    urls = dataset_urls(cfg.store)
    s_store = RowStore.open(urls["s"], storage_options=so)
    c_store = RowStore.open(urls["clip"], storage_options=so)
    if c_store.n_rows != s_store.n_rows:
        raise EditError(
            f"{urls['clip']} has {c_store.n_rows} rows, {urls['s']} has {s_store.n_rows}"
        )
    layout = SLayout.from_dict(s_store.attrs["layout"])
    if clip is None:
        from stages.execution import load_clip_ref

        clip = load_clip_ref(clip_ref or ClipRef(), device)

    # --- everything checked before any work ---
    mapper, mapper_cfg = None, {}
    if cfg.method == "mapper":
        mapper, mapper_cfg = _load_mapper(cfg.mapper, layout, clip.embed_dim, so)
        check_mapper(mapper, mapper_cfg, layout, clip, c_store.attrs, s_store.attrs)
        mapper = mapper.to(device).eval()
    # the channels the edit moves: the mapper's (conv, or all with train.channels all)
    work = getattr(mapper, "s_layout", layout) if mapper is not None else layout
    relevance = None
    need_rel = cfg.method == "global-direction" or any(e.beta > 0 for e in edits)
    if need_rel:
        relevance = load_relevance(cfg.relevance, so)
        check_relevance(relevance, layout, clip)
    # ids only when the selection names rows by id (a str per row: not read otherwise)
    manifest_ids = _manifest_ids(urls["manifest"], s_store.n_rows, so) if cfg.select.ids else None
    ok = np.intersect1d(s_store.ok_rows(), c_store.ok_rows())
    rows = select_rows(cfg.select, ok, s_store.n_rows, manifest_ids)
    if len(rows) == 0:
        raise EditError(f"no ok rows to edit in {cfg.store} (selection {cfg.select})")
    prepared = []
    for edit in edits:
        neutral = cfg.neutral_for(edit)
        targets = prepare_targets(
            edit, neutral, clip, cfg.templates, _dirs(relevance), layout, work
        )
        prepared.append((edit, neutral, targets))

    selected = np.zeros(s_store.n_rows, dtype=bool)
    selected[rows] = True
    keys = row_keys(s_store)
    results = []
    for edit, neutral, targets in prepared:
        t0 = time.perf_counter()
        attrs = _provenance(cfg, edit, neutral, targets, s_store, c_store, clip, mapper, relevance)
        if execution.precision != "fp32" and mapper is not None:  # bf16 rows differ from fp32
            attrs["precision"] = execution.precision
        if cfg.dtype != "float32":  # part of the fingerprint: dtypes are never mixed
            attrs["dtype"] = cfg.dtype
        if edit.chord > 0 and mapper is not None:  # recorded only when on (fingerprints as before)
            attrs["chord"] = edit.chord
        attrs["fingerprint"] = edit_fingerprint(attrs)
        url = edit_url(cfg, edit)
        spec = {"s": ArraySpec((layout.dim,), cfg.dtype)}
        gd = None
        if cfg.method == "global-direction":
            s_std_conv = torch.as_tensor(relevance.s_std[layout.conv_index()])
            gd = global_direction_delta(relevance.directions, s_std_conv, targets)

        task = _EditTask(
            absolute(s_store.url),
            absolute(c_store.url),
            targets=tuple(targets),
            layout=work,
            mapper_url=absolute(cfg.mapper) if mapper is not None else None,
            mapper_for=(layout, clip.embed_dim),
            gd=gd,
            batch_size=execution.batch_size,
            device=execution.device,
            storage_options=dict(so),
            model=mapper if not execution.scheduler_address else None,
            precision=execution.precision,
        )

        def compute(c_url: str, todo: np.ndarray, task=task, name=edit.name) -> PassSummary:
            """Edit the rows `todo` (new or changed since the last edit) into c_url."""
            c_out = RowStore.open(c_url, storage_options=so)
            blocks = c_out.pending_blocks()
            return run_blocks(
                replace(task, out_url=absolute(c_url), rows=todo),
                blocks,
                execution,
                f"edit {name}",
                c_out.n_blocks,
                progress,
                resources=execution.model_resources(),
            )

        out, summary, counts = update_output(
            url,
            s_store.rows_per_shard,
            spec,
            attrs,
            keys,
            selected,
            compute,
            execution,
            f"edit {edit.name}",
            restart_on_change=True,
            progress=False,
        )
        dt = time.perf_counter() - t0
        total = out.status()
        n_edit_all = int((total == int(Status.OK)).sum())
        n_bad = int((total == int(Status.NON_FINITE)).sum())
        failed = f", {n_bad} failed: non-finite output" if n_bad else ""
        log(
            f"edit {edit.name}: {n_edit_all} rows edited, "
            f"{s_store.n_rows - n_edit_all - n_bad} skipped (not selected or not ok upstream)"
            f"{failed}, {counts.computed / max(dt, 1e-9):.0f} rows/s -> {url}"
        )
        log(counts.line(f"edit {edit.name}"))
        for note in summary.notes:
            log(f"  {note}")
        results.append(EditResult(edit.name, url, n_edit_all, s_store.n_rows - n_edit_all, dt))
    return results


def row_keys(store: Any, rows: slice | None = None) -> np.ndarray:
    """The rows' keys for reusing edits and renders: the sha256 of each row's source bytes,
    or, for stores without keys (sampled rows, imported latents), the row's position.
    `rows`: a slice of the rows (all when None)."""
    from store import update as up

    sl = rows if rows is not None else slice(0, store.n_rows)
    if up.KEY in store.specs:
        return up.as_str(store.read(up.KEY, rows=sl))
    return np.array([f"row:{i}" for i in range(*sl.indices(store.n_rows))], dtype=str)


def conv_runs(layout: SLayout) -> list[tuple[slice, slice]]:
    """(slice of flat S, slice of conv-only S) for each conv layer: contiguous runs, so
    adding the delta is a few slice adds instead of a gather/scatter."""
    runs, pos = [], 0
    for la in layout.conv_layers:
        runs.append((slice(la.offset, la.offset + la.channels), slice(pos, pos + la.channels)))
        pos += la.channels
    return runs


@torch.inference_mode()
def edit_rows(
    s: np.ndarray,
    c: np.ndarray | None,
    targets: Sequence[TargetDelta],
    layout: SLayout,
    mapper: Any | None,
    gd_delta: torch.Tensor | None,
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """s' [n, D] for rows s [n, D] (c [n, E] for the mapper), in batches of batch_size.

    `layout`: the layout whose conv channels the delta covers (the mapper's s_layout);
    `precision`: the mapper's compute dtype (bf16: autocast; the delta is added in fp32).
    """
    out = np.array(s, dtype=np.float32, copy=True)
    runs = conv_runs(layout)
    if mapper is not None:  # the mapped channels of every row, gathered once per block
        mapped = np.ascontiguousarray(out[:, layout.conv_index()])
        c32 = np.ascontiguousarray(c, dtype=np.float32)
    for i in range(0, len(s), batch_size):
        rows = slice(i, i + batch_size)
        if mapper is not None:
            # always batch_size rows (the last batch padded): a row's delta does not depend
            # on which rows share its batch, so reused and recomputed edits agree bitwise
            if i + batch_size <= len(s):
                s_b, c_b = mapped[rows], c32[rows]  # views, no copy
            else:
                take = np.minimum(np.arange(i, i + batch_size), len(s) - 1)
                s_b, c_b = mapped[take], c32[take]
            s_conv, cb = to_device(s_b, device), to_device(c_b, device)
            with autocast(device, precision):
                delta = mapper_delta(mapper, s_conv, cb, targets)
            delta = delta.float().cpu().numpy()
            delta = delta[: len(out[rows])]
        else:
            delta = gd_delta.float().cpu().numpy()[None]
        for flat, conv in runs:
            out[rows, flat] += delta[:, conv]
    return out


def check_relevance(rel: Relevance, layout: SLayout, clip: Any) -> None:
    d = rel.directions
    if tuple(d.shape) != (layout.conv_dim, clip.embed_dim):
        raise EditError(
            f"relevance directions have shape {tuple(d.shape)}, this store and CLIP need "
            f"({layout.conv_dim}, {clip.embed_dim}); rerun `deltaedit relevance`"
        )
    fp = rel.attrs.get("clip")
    if isinstance(fp, str) and fp != clip.fingerprint and rel.attrs.get("method") != "official-fs3":
        raise EditError(
            f"relevance was computed with CLIP {fp[:12]}, the params name CLIP "
            f"{clip.fingerprint[:12]}; rerun `deltaedit relevance`"
        )


def _dirs(rel: Relevance | None) -> torch.Tensor | None:
    return None if rel is None else rel.directions


def _load_mapper(
    path: str, layout: SLayout, clip_dim: int, storage_options: dict | None = None
) -> tuple[Any, dict]:
    """This project's safetensors (its config says what it was trained for), or an official
    .pth state dict (no config: built for the store's layout and the CLIP's size). `path`
    may be a URL (copied to a temp folder with its .json first)."""
    import tempfile
    from pathlib import Path

    from model.mapper import load_mapper
    from store.fs import exists, fetch_local

    if not exists(path, storage_options):
        raise EditError(f"{path}: no mapper checkpoint (run `deltaedit train` first)")
    with tempfile.TemporaryDirectory(prefix="deltaedit-mapper-") as tmp:
        local = fetch_local(path, tmp, storage_options, sidecars=(".json",))
        if path.endswith(".safetensors"):
            mapper = load_mapper(local)
        else:
            mapper = load_mapper(local, layout=layout, clip_dim=clip_dim)
        cfg: dict = {}
        side = Path(local).with_suffix(".json")
        if side.exists():
            try:
                cfg = json.loads(side.read_text())
            except json.JSONDecodeError:
                cfg = {}
    return mapper, cfg


def _manifest_ids(url: str, n_rows: int, storage_options: dict | None = None) -> np.ndarray | None:
    from store import RowStore, StoreError

    try:
        m = RowStore.open(url, storage_options=storage_options)
    except (StoreError, FileNotFoundError):
        return None
    if m.n_rows != n_rows or "ids" not in m.array_names:
        return None
    return m.read("ids")


def _provenance(
    cfg: EditConfig,
    edit: ResolvedEdit,
    neutral: str,
    targets: Sequence[TargetDelta],
    s_store: Any,
    c_store: Any,
    clip: Any,
    mapper: Any | None,
    relevance: Relevance | None,
) -> dict:
    return {
        "stage": "edit",
        "name": edit.name,
        "base_name": edit.base_name,
        "sweep": edit.sweep,
        "method": cfg.method,
        "antisymmetric": bool(cfg.antisymmetric and mapper is not None),
        "mean_pull": edit.mean_pull if mapper is not None else None,  # 1 = plain
        "targets": list(edit.targets),
        "neutral": neutral,
        "alphas": list(edit.alphas),
        "beta": edit.beta,
        "levels": list(edit.levels),
        "templates": list(cfg.templates),
        "delta_t": [t.delta_t.tolist() for t in targets],
        "channels_kept": [int(t.mask.sum()) for t in targets],
        "mapper": None if mapper is None else getattr(mapper, "fingerprint", None),
        "mapper_path": cfg.mapper if mapper is not None else None,
        "clip": clip.fingerprint,
        "clip_name": clip.name,
        "relevance": None if relevance is None else relevance.attrs.get("fingerprint"),
        "source": s_store.url,
        "source_clip": c_store.url,
        "source_fingerprint": s_store.attrs.get("fingerprint"),
        "layout": s_store.attrs["layout"],
        "selection": {
            "ids": list(cfg.select.ids),
            "range": list(cfg.select.range),
            "sample": cfg.select.sample,
            "seed": cfg.select.seed,
        },
    }


def config_error_line(exc: ConfigError) -> str:
    return f"{exc.key}: got {exc.value!r}, expected {exc.expected}"


__all__ = [
    "EditConfig",
    "EditSpec",
    "EditError",
    "Selection",
    "TargetDelta",
    "apply_delta",
    "beta_mask",
    "global_direction_delta",
    "level_mask",
    "mapped_delta",
    "mapper_condition",
    "mapper_delta",
    "run",
    "text_delta",
]
