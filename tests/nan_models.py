"""The deltaedit CLI with models that return NaN for some rows (used by test_reliability.py).

    python tests/nan_models.py encode-clip --dataset ds ...

runs the real command, except that every model it loads gives NaN for the rows whose input
starts with a positive number (about half of random inputs): the CLIP image tower (first
pixel), the e4e encoder (first pixel), the generator's mapping (z[0]) and the Delta Mapper
(s[0]). Forward hooks on the real modules; nothing else is changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def poison(out: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """`out` with NaN in the rows whose `first` value is positive."""
    out = out.clone()
    out[first.reshape(len(first), -1)[:, 0] > 0] = float("nan")
    return out


def install() -> None:
    import model.clip as clip_mod
    import model.e4e as e4e_mod
    import model.mapper as mapper_mod
    import model.stylegan2 as g_mod

    def hooked(loader, attach):
        def load(*args, **kwargs):
            obj = loader(*args, **kwargs)
            attach(obj)
            return obj

        return load

    def clip_hook(clip) -> None:
        clip.model.visual.register_forward_hook(lambda m, inp, out: poison(out, inp[0]))

    def module_hook(module) -> None:
        module.register_forward_hook(lambda m, inp, out: poison(out, inp[0]))

    def mapping_hook(G) -> None:
        mapping = G.mapping
        G.mapping = lambda z, *a, **k: poison(mapping(z, *a, **k), z)

    clip_mod.load_clip = hooked(clip_mod.load_clip, clip_hook)
    e4e_mod.create_e4e = hooked(e4e_mod.create_e4e, module_hook)
    e4e_mod.load_e4e = hooked(e4e_mod.load_e4e, module_hook)
    g_mod.create_generator = hooked(g_mod.create_generator, mapping_hook)
    g_mod.load_generator = hooked(g_mod.load_generator, mapping_hook)
    mapper_mod.load_mapper = hooked(mapper_mod.load_mapper, module_hook)


if __name__ == "__main__":
    install()
    from pipeline.cli import main

    main(prog_name="deltaedit")
