"""Weights of the conformance fixtures, regenerated from the documented rule
(`golden-weights-v1`, tests/fixtures/README of ../shared/conformance).

Each manifest entry [key, shape, kind] draws once from one numpy Generator, in
manifest order (except the fixed FIR buffers, which draw nothing).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def load_manifest(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.manifest.json").read_text())


def golden_weights(manifest: dict) -> OrderedDict[str, torch.Tensor]:
    if manifest["rule_version"] != "golden-weights-v1":
        raise ValueError(f"unknown weight rule {manifest['rule_version']!r}")
    rng = np.random.default_rng(manifest["seed"])
    k = np.asarray(manifest.get("blur_kernel", [1, 3, 3, 1]), dtype=np.float32)
    fir = np.outer(k, k) / np.outer(k, k).sum() * np.float32(4)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape, kind in manifest["manifest"]:
        shape = tuple(shape)
        if kind == "fir_up2":
            x = np.broadcast_to(fir.astype(np.float32), shape).copy()
        elif kind == "const_one":
            x = np.ones(shape, np.float32)
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
            if kind in ("normal", "noise"):
                pass
            elif kind == "small":
                x = np.float32(0.1) * x
            elif kind == "bias_one":
                x = np.float32(1) + np.float32(0.1) * x
            elif kind == "normal_x100":
                x = np.float32(100) * x
            elif kind == "positive":
                x = np.abs(x) + np.float32(0.5)
            else:
                raise ValueError(f"{key}: unknown weight kind {kind!r}")
        out[key] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return out


def fixture_arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}
