"""Ablation in the shapes world: what alpha, beta, levels, method and the mapper's training
seed do to edits scored against the known truth (stages.world.score / world_evaluate).

Needs the default pipeline's outputs (`dvc repro`: data/images, data/world, data/relevance.zarr,
data/mapper.safetensors). Edits are computed in memory with the edit stage's functions on the
mapper's held-out rows; nothing under data/ is written (the seed runs train into a temp dir).

    .venv/bin/python bench/world_ablation.py            # one factor at a time + 3 seeds
    .venv/bin/python bench/world_ablation.py --full     # the full alpha x beta x levels grid
    .venv/bin/python bench/world_ablation.py --quick    # 16 rows, no seed runs
    .venv/bin/python bench/world_ablation.py --seeds-only --precision bf16  # scores under bf16

Prints, per family (color, shape, background, size): target reached / all others kept /
PSNR vs the counterfactual (dB) / centroid drift (px).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.layout import SLayout  # noqa: E402
from pipeline.params import load_params, section  # noqa: E402
from stages.common import ClipRef, ExecutionConfig, GeneratorRef, autocast  # noqa: E402
from stages.edit import (  # noqa: E402
    EditConfig,
    ResolvedEdit,
    _load_mapper,
    _manifest_ids,
    dataset_urls,
    edit_rows,
    global_direction_delta,
    load_relevance,
    prepare_targets,
)
from stages.evaluate import held_out_rows  # noqa: E402
from stages.execution import load_clip_ref, load_generator_ref  # noqa: E402
from stages.train import TrainConfig  # noqa: E402
from stages.world.evaluate import (  # noqa: E402
    FAMILIES,
    clip_embed,
    oracle_s,
    prompt_to_target,
    truth_images_for,
)
from stages.world.score import evaluate_edits, scenes_for_ids  # noqa: E402
from store import RowStore  # noqa: E402

LEVELS = {
    "all": ("coarse", "medium", "fine"),
    "coarse+medium": ("coarse", "medium"),
    "coarse": ("coarse",),
    "medium": ("medium",),
    "fine": ("fine",),
}
ALPHAS = (0.5, 1.0, 2.0)
BETAS = (0.0, 0.03, 0.1)
# antisymmetric: the mapper as (M(d) - M(-d)) / 2 (edit.antisymmetric)
METHODS = ("mapper", "antisymmetric", "global-direction")
KEYS = ("target_reached", "all_others_kept", "psnr_vs_counterfactual", "centroid_drift_px")


class Setup:
    """The default pipeline's stores and models, loaded once."""

    def __init__(
        self,
        params_path: str,
        n_rows: int,
        mapper_path: str | None = None,
        precision: str = "fp32",
    ):
        params = load_params(params_path)
        self.precision = precision  # execution.precision of the mapper and the renders
        self.edit_cfg = section(params, "edit", EditConfig)
        self.train_cfg = section(params, "train", TrainConfig)
        self.clip_ref = section(params, "clip", ClipRef)
        self.gen_ref = section(params, "generator", GeneratorRef)
        self.labels = params.get("world", {}).get("out_dir", "data/world")
        store = self.edit_cfg.store
        urls = dataset_urls(store)
        self.s_store, self.c_store = RowStore.open(urls["s"]), RowStore.open(urls["clip"])
        self.layout = SLayout.from_dict(self.s_store.attrs["layout"])
        self.ids = _manifest_ids(urls["manifest"], self.s_store.n_rows)
        self.G = load_generator_ref(self.gen_ref, "cpu")
        self.clip = load_clip_ref(self.clip_ref, "cpu")
        self.rel = load_relevance(self.edit_cfg.relevance)
        self.n_rows = n_rows
        self.edits = []
        for spec in self.edit_cfg.edits:
            parsed = prompt_to_target(spec.targets[0])
            if parsed is not None:
                self.edits.append((spec, parsed))
        self.use_mapper(mapper_path or self.edit_cfg.mapper)

    def use_mapper(self, path: str) -> None:
        """Load a mapper and take its held-out rows (its own seeded split)."""
        self.mapper, _ = _load_mapper(path, self.layout, self.clip.embed_dim)
        self.mapper.eval()
        ok = np.intersect1d(self.s_store.ok_rows(), self.c_store.ok_rows())
        self.rows, self.where = held_out_rows(path, self.edit_cfg.store, ok, self.n_rows, 0)
        self.s = self.s_store.read("s", rows=self.rows).astype(np.float32)
        self.c = self.c_store.read("embed", rows=self.rows).astype(np.float32)
        self.world, self.scenes = scenes_for_ids(self.labels, [str(self.ids[r]) for r in self.rows])

    def score(self, method: str, alpha: float, beta: float, levels: tuple[str, ...] | None) -> dict:
        """family -> {key: value} for one configuration (all edits of that family pooled);
        levels None = each edit's own levels (params)."""
        per_family: dict[str, list[dict]] = {f: [] for f in FAMILIES}
        for spec, (attribute, value) in self.edits:
            edit = ResolvedEdit(
                name=spec.name,
                base_name=spec.name,
                sweep=None,
                targets=spec.targets,
                alphas=tuple(a * alpha for a in spec.target_alphas),
                neutral=spec.neutral,
                beta=beta,
                levels=tuple(spec.levels) if levels is None else levels,
                # the mapper form (mapped_delta): antisymmetric with the edit's mean_pull;
                # the oracle follows the pipeline's edit.antisymmetric; else plain (1)
                mean_pull=spec.mean_pull
                if method == "antisymmetric" or (method == "oracle" and self.edit_cfg.antisymmetric)
                else 1.0,
                chord=self.edit_cfg.chord,
            )
            neutral = self.edit_cfg.neutral_for(edit)
            # the mapper moves its own channels (conv, or all with train.channels all)
            uses_mapper = method in ("mapper", "antisymmetric", "oracle")
            work = self.mapper.s_layout if uses_mapper else self.layout
            targets = prepare_targets(
                edit,
                neutral,
                self.clip,
                self.edit_cfg.templates,
                self.rel.directions,
                self.layout,
                work,
            )
            if method == "no-edit":
                s_edit = self.s
            elif method == "oracle":  # the mapper on the true image delta (world_evaluate)
                truth = truth_images_for(self.scenes, attribute, value, self.world)
                c_true = clip_embed(self.clip, truth, self.clip_ref.preprocessing)
                pull = edit.mean_pull
                s_edit = oracle_s(self.mapper, self.s, self.c, c_true, self.layout, pull)
            elif method in ("mapper", "antisymmetric"):
                s_edit = edit_rows(
                    self.s, self.c, targets, work, self.mapper, None, 64, precision=self.precision
                )
            else:
                s_std = torch.as_tensor(self.rel.s_std[self.layout.conv_index()])
                gd = global_direction_delta(self.rel.directions, s_std, targets)
                s_edit = edit_rows(self.s, None, targets, self.layout, None, gd, 64)
            with autocast("cpu", self.precision):  # the edited rows rendered in that dtype
                rep = evaluate_edits(self.scenes, s_edit, attribute, value, self.G, self.world)
            per_family[attribute].append(rep)
        out = {}
        for fam, reps in per_family.items():
            reps = [r for r in reps if r.get("status") == "ok" and r["n_scored"]]
            if not reps:
                continue
            n = sum(r["n_scored"] for r in reps)
            out[fam] = {k: sum((r[k] or 0.0) * r["n_scored"] for r in reps) / n for k in KEYS} | {
                "n": n
            }
        return out


def fmt_row(label: str, fams: dict) -> str:
    cells = []
    for f in FAMILIES:
        x = fams.get(f)
        cells.append(
            "        --         "
            if x is None
            else f"{x['target_reached']:.2f} {x['all_others_kept']:.2f} "
            f"{x['psnr_vs_counterfactual']:5.1f} {x['centroid_drift_px']:4.1f}"
        )
    return f"{label:<40}" + " | ".join(cells)


def header() -> str:
    h1 = f"{'config':<40}" + " | ".join(f"{f:^21}" for f in FAMILIES)
    h2 = f"{'':<40}" + " | ".join(
        f"{'tgt':>4} {'oth':>4} {'psnr':>5} {'drft':>4}" for _ in FAMILIES
    )
    return f"{h1}\n{h2}\n{'-' * len(h2)}"


def configs(full: bool) -> list[tuple[str, float, float, str]]:
    if full:
        return list(itertools.product(METHODS, ALPHAS, BETAS, LEVELS))
    out = []
    for m in METHODS:  # one factor at a time around alpha 1, beta 0, all levels
        out += [(m, a, 0.0, "all") for a in ALPHAS]
        out += [(m, 1.0, b, "all") for b in BETAS if b != 0.0]
        out += [(m, 1.0, 0.0, lv) for lv in LEVELS if lv != "all"]
    return out


def seed_runs(setup: Setup, seeds: tuple[int, ...]) -> None:
    from stages.train import run as run_train

    print(
        f"\n== mapper training seeds {seeds} (train.iterations {setup.train_cfg.iterations}, "
        f"stores {list(setup.train_cfg.stores)}; alpha 1, beta 0, each edit's levels; each seed "
        f"scored on its own held-out rows; precision {setup.precision}) =="
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = TrainConfig(
                **{
                    **setup.train_cfg.__dict__,
                    "seed": seed,
                    "out": f"{tmp}/mapper_{seed}.safetensors",
                    "metrics_dir": f"{tmp}/metrics_{seed}",
                }
            )
            ex = ExecutionConfig(device="cpu", precision=setup.precision)
            run_train(cfg, ex, progress=False, log=lambda _: None)
            setup.use_mapper(cfg.out)
            method = "antisymmetric" if setup.edit_cfg.antisymmetric else "mapper"
            fams = setup.score(method, 1.0, 0.0, None)
            results.append(fams)
            print(fmt_row(f"seed {seed} ({time.perf_counter() - t0:.0f} s)", fams))
    print(f"mean +- std over seeds {seeds}:")
    for k in KEYS:
        line = f"{k:<26}"
        for f in FAMILIES:
            v = np.array([r[f][k] for r in results if f in r])
            line += f" | {f}: {v.mean():6.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:5.3f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n-rows", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="the full alpha x beta x levels grid")
    ap.add_argument("--quick", action="store_true", help="16 rows, no seed runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seeds-only", action="store_true", help="only the mapper seed runs")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="execution.precision of the mapper's training steps, the edits and the scored renders",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    setup = Setup(args.params, 16 if args.quick else args.n_rows, precision=args.precision)
    print(
        f"== ablation on {len(setup.rows)} {setup.where} rows of {setup.edit_cfg.store}; "
        f"edits {[s.name for s, _ in setup.edits]} =="
    )
    print("cells: target reached, all others kept, PSNR vs counterfactual (dB), drift (px)")
    print(header())
    print(fmt_row("baseline: no edit", setup.score("no-edit", 1.0, 0.0, LEVELS["all"])))
    print(
        fmt_row(
            "baseline: oracle image delta (mapper)", setup.score("oracle", 1.0, 0.0, LEVELS["all"])
        )
    )
    for method, alpha, beta, lv in [] if args.seeds_only else configs(args.full):
        fams = setup.score(method, alpha, beta, LEVELS[lv])
        print(fmt_row(f"{method} a={alpha:g} b={beta:g} {lv}", fams), flush=True)
    if not args.quick:
        seed_runs(setup, tuple(int(s) for s in args.seeds.split(",")))
    print(f"\nworld ablation: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
