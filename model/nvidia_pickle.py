"""NVIDIA StyleGAN2 pickles (stylegan2-ada-pytorch, stylegan3's SG2) read as data.

A network pickle holds `{"G", "D", "G_ema", "augment_pipe", ...}` whose modules
are `torch_utils.persistence` objects: each is pickled as
`_reconstruct_persistent_obj(meta)` where `meta` carries the class's *source
code* and the module state. Loading it with `pickle.load` would execute that
source. Here a restricted `pickle.Unpickler` resolves only:

- tensor rebuild functions (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, ...)
  and storages, which are read with `torch.load(weights_only=True)`;
- plain containers (`collections.OrderedDict`, `builtins.set`), torch dtypes and
  `torch.Size`, numpy scalars / arrays (data only);
- the NVIDIA classes (`torch_utils.*`, `training.networks*`, `dnnlib.util.EasyDict`),
  rebuilt as inert `NvidiaObject` holders: the recorded state (the module's
  `__dict__`: `_parameters`, `_buffers`, `_modules`, plain attributes) is kept as a
  dict and read; `module_src` is never executed, no method of the file is called.

Anything else (`os.system`, `builtins.eval`, `subprocess.*`, ...) is refused with a
`CheckpointError` before it is called.

Parameter mapping onto `model.stylegan2.Generator` (rosinality names):

    NVIDIA `G_ema.`                          here (rosinality names)
    mapping.fc{i}.weight / bias              style.{i+1}.weight / bias
    mapping.w_avg [W]                        latent_avg (truncation centre)
    synthesis.b4.const [C, 4, 4]             input.input [1, C, 4, 4]
    synthesis.b4.conv1 / torgb               conv1 / to_rgb1
    synthesis.b{2^(i+3)}.conv0/conv1/torgb   convs.{2i} / convs.{2i+1} / to_rgbs.{i}
    <layer>.weight [O, I, k, k]              <layer>.conv.weight [1, O, I, k, k]
    <layer>.affine.weight / bias             <layer>.conv.modulation.weight / bias
    conv .bias [O] / toRGB .bias [3]         .activate.bias [O] / .bias [1, 3, 1, 1]
    .noise_strength [] / .noise_const [r, r] .noise.weight [1] / noises.noise_j [1, 1, r, r]

Differences between the two implementations, and why the mapping is exact or close:
- affine: both compute `w @ (A / sqrt(W)).T + b` (NVIDIA bias_init 1 = rosinality's 1).
- toRGB: NVIDIA multiplies the styles by `1 / sqrt(I)`, rosinality the weight; the
  product is the same. S here is the affine output (rosinality's convention).
- modulated conv: NVIDIA demodulates the raw weight, rosinality the weight times
  `1 / sqrt(I k k)`; the scale cancels in demodulation except inside the 1e-8
  epsilon (relative difference ~1e-8 * I k k / sum W^2, negligible).
- NVIDIA's fused grouped modconv vs the shared-weight activation scaling here: the
  same linear map, float rounding only.
- upsampling conv: NVIDIA `conv2d_resample(up=2, padding=1)` runs a stride-2
  transposed conv with the unflipped weight, then upfirdn2d with the [1,3,3,1]
  filter, pad (1, 1), gain 4: the same as rosinality. The toRGB skip upsample is
  `upsample2d` = up 2, pad (2, 1), gain 4 in both.
- `conv_clamp` (256 in the ada configs) clamps conv and toRGB outputs; kept via
  `GeneratorConfig.conv_clamp`. NVIDIA runs the highest resolutions in fp16 on GPU;
  this implementation computes in float32.
- mapping lr multiplier is read from the file (`bias_gain`); z_dim and the
  mapping's hidden widths come from the fc shapes.
Unsupported (refused with a clear error): conditional generators (c_dim > 0),
'resnet' / 'orig' synthesis architectures, StyleGAN3 synthesis, other filters.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import CheckpointError

__all__ = ["NvidiaObject", "RestrictedUnpickler", "load_nvidia_generator_state", "read_pickle"]


class NvidiaObject:
    """Inert holder for an NVIDIA class instance: its name and its recorded state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.class_name = type(self).__name__
        self.args = args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"_state": state}

    # -- read helpers ---------------------------------------------------
    def child(self, name: str) -> NvidiaObject | None:
        return (self.state.get("_modules") or {}).get(name)

    def children(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})

    def tensor(self, name: str) -> torch.Tensor | None:
        for group in ("_parameters", "_buffers"):
            t = (self.state.get(group) or {}).get(name)
            if t is not None:
                return t.detach() if isinstance(t, torch.Tensor) else t
        return None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def __repr__(self) -> str:
        return f"<NvidiaObject {self.class_name}>"


class EasyDictData(dict):
    """`dnnlib.util.EasyDict` as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        pass


_HOLDERS: dict[str, type] = {}


def _holder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _HOLDERS:
        _HOLDERS[key] = type(name, (NvidiaObject,), {"__module__": "model.nvidia_pickle"})
    return _HOLDERS[key]


def _reconstruct_persistent_obj(meta: Any) -> NvidiaObject:
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: data only."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise pickle.UnpicklingError("malformed persistent object record")
    obj = _holder("persistent", str(meta["class_name"]))()
    obj.__setstate__(meta.get("state") or {})
    return obj  # meta["module_src"] is never executed


def _load_storage_bytes(b: bytes) -> Any:
    """torch.storage._load_from_bytes, weights-only."""
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())


def _rebuild_tensor(storage, offset, size, stride):
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, hooks=None, *_):
    return torch.nn.Parameter(_as_tensor(data), requires_grad=bool(requires_grad))


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("tensor rebuild through an unexpected function")
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"tensor subclass {new_type!r} is not data")
    return func(*args)


def _as_tensor(data: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data


def _dtype(*args: Any) -> np.dtype:
    if not args or not isinstance(args[0], str):
        raise pickle.UnpicklingError("numpy dtype from a non-string")
    return np.dtype(args[0])


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictData,
    ("dnnlib", "EasyDict"): EasyDictData,
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): np.ndarray,
}


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array of a foreign subtype")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy object scalars are not data")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


for _m in _NUMPY_MODULES:
    _ALLOWED[(_m, "scalar")] = _np_scalar
    _ALLOWED[(_m, "_reconstruct")] = _np_reconstruct

_NVIDIA_MODULE = re.compile(r"^(torch_utils(\.[\w.]+)?|training\.networks\w*|training\.\w+)$")


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable or class outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals listed above; NVIDIA classes become inert holders."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if _NVIDIA_MODULE.match(module) and re.fullmatch(r"[A-Z]\w*", name):
            return _holder(module, name)  # a class of the network code: data holder
        if module.startswith("dnnlib.tflib"):
            raise RefusedGlobal(
                f"refused global {module}.{name}: a TensorFlow StyleGAN pickle; convert it "
                "to a PyTorch one first (stylegan2-ada-pytorch legacy.py)"
            )
        raise RefusedGlobal(
            f"refused global {module}.{name}: not a tensor, a container or a StyleGAN2 "
            f"network class (the file may try to run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported in network pickles")


def read_pickle(path: str | Path) -> Any:
    """Unpickle `path` with the restricted unpickler; CheckpointError on anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: refused to load: {exc}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # truncated / corrupt: EOFError, ValueError, ...
        raise CheckpointError(
            f"{path}: not a readable network pickle ({type(exc).__name__}: {exc})"
        ) from None


# --------------------------------------------------------------------------- mapping
def _need(obj: NvidiaObject | None, what: str, source: str) -> NvidiaObject:
    if not isinstance(obj, NvidiaObject):
        raise CheckpointError(f"{source}: NVIDIA generator lacks {what}")
    return obj


def _t(obj: NvidiaObject, name: str, where: str, source: str) -> torch.Tensor:
    t = obj.tensor(name)
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source}: NVIDIA generator lacks tensor {where}.{name}")
    return t.detach().to(torch.float32)


def _check_filter(f: Any, where: str, source: str) -> None:
    if f is None:
        return
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    ref = torch.outer(k, k) / 64 if f.ndim == 2 else k / 8
    if tuple(f.shape) != tuple(ref.shape) or not torch.allclose(f.float(), ref, atol=1e-6):
        raise CheckpointError(f"{source}: {where}.resample_filter is not [1,3,3,1]; unsupported")


def _find_generator(obj: Any, source: str) -> NvidiaObject:
    if isinstance(obj, dict):
        for key in ("G_ema", "G"):
            if isinstance(obj.get(key), NvidiaObject):
                return obj[key]
        raise CheckpointError(
            f"{source}: network pickle has no 'G_ema' generator (keys: {sorted(obj)[:8]})"
        )
    if isinstance(obj, NvidiaObject) and obj.child("synthesis") is not None:
        return obj
    raise CheckpointError(f"{source}: not a StyleGAN2 network pickle ({type(obj).__name__})")


def nvidia_to_state(G: NvidiaObject, source: str = "pickle") -> tuple[dict, dict[str, Any]]:
    """rosinality-named tensors + config overrides (lr_mlp, conv_clamp) from `G_ema`."""
    mapping = _need(G.child("mapping"), "'mapping'", source)
    synthesis = _need(G.child("synthesis"), "'synthesis'", source)
    if int(G.attr("c_dim", mapping.attr("c_dim", 0)) or 0) > 0 or mapping.child("embed"):
        raise CheckpointError(f"{source}: conditional generators (c_dim > 0) are not supported")
    if int(G.attr("img_channels", 3)) != 3:
        raise CheckpointError(f"{source}: only 3-channel generators are supported")
    state: dict[str, torch.Tensor] = {}

    fcs = sorted(
        (int(m.group(1)), name)
        for name in mapping.children()
        if (m := re.fullmatch(r"fc(\d+)", name))
    )
    if not fcs:
        raise CheckpointError(f"{source}: NVIDIA mapping network has no fc layers")
    lr_mlp = 0.01
    for i, name in fcs:
        fc = _need(mapping.child(name), f"mapping.{name}", source)
        if fc.attr("activation", "lrelu") != "lrelu":
            raise CheckpointError(f"{source}: mapping.{name} activation is not lrelu")
        state[f"style.{i + 1}.weight"] = _t(fc, "weight", f"mapping.{name}", source)
        state[f"style.{i + 1}.bias"] = _t(fc, "bias", f"mapping.{name}", source)
        lr_mlp = float(fc.attr("bias_gain", lr_mlp))
    w_avg = mapping.tensor("w_avg")
    if isinstance(w_avg, torch.Tensor):
        state["latent_avg"] = w_avg.detach().to(torch.float32)

    blocks = sorted(
        (int(m.group(1)), name)
        for name in synthesis.children()
        if (m := re.fullmatch(r"b(\d+)", name))
    )
    if not blocks or blocks[0][0] != 4:
        raise CheckpointError(f"{source}: NVIDIA synthesis has no b4 block (StyleGAN3?)")
    clamp: Any = None

    def layer(lay: NvidiaObject | None, prefix: str, where: str, noise_j: int | None) -> None:
        nonlocal clamp
        lay = _need(lay, where, source)
        weight = _t(lay, "weight", where, source)
        state[f"{prefix}.conv.weight"] = weight[None]
        affine = _need(lay.child("affine"), f"{where}.affine", source)
        state[f"{prefix}.conv.modulation.weight"] = _t(affine, "weight", f"{where}.affine", source)
        state[f"{prefix}.conv.modulation.bias"] = _t(affine, "bias", f"{where}.affine", source)
        bias = _t(lay, "bias", where, source)
        if lay.attr("conv_clamp") is not None:
            clamp = float(lay.attr("conv_clamp"))
        _check_filter(lay.tensor("resample_filter"), where, source)
        if noise_j is None:  # toRGB
            state[f"{prefix}.bias"] = bias.reshape(1, -1, 1, 1)
            return
        state[f"{prefix}.activate.bias"] = bias
        res = int(lay.attr("resolution", 0)) or None
        const, strength = lay.tensor("noise_const"), lay.tensor("noise_strength")
        if lay.attr("use_noise", True) and const is not None and strength is not None:
            state[f"{prefix}.noise.weight"] = strength.to(torch.float32).reshape(1)
            state[f"noises.noise_{noise_j}"] = const.to(torch.float32)[None, None]
        else:  # use_noise=False: no noise at all
            side = res or None
            state[f"{prefix}.noise.weight"] = torch.zeros(1)
            state[f"noises.noise_{noise_j}"] = torch.zeros(1, 1, side or 1, side or 1)

    for i, (res, name) in enumerate(blocks):
        block = _need(synthesis.child(name), f"synthesis.{name}", source)
        arch = block.attr("architecture", "skip")
        if arch != "skip":
            raise CheckpointError(
                f"{source}: synthesis architecture {arch!r} is not supported (only 'skip')"
            )
        if res != 4 * 2**i:
            raise CheckpointError(f"{source}: synthesis blocks are not 4, 8, 16, ...: {blocks}")
        _check_filter(block.tensor("resample_filter"), f"synthesis.{name}", source)
        where = f"synthesis.{name}"
        if i == 0:
            const = _t(block, "const", where, source)
            state["input.input"] = const[None]
            layer(block.child("conv1"), "conv1", f"{where}.conv1", 0)
            layer(block.child("torgb"), "to_rgb1", f"{where}.torgb", None)
        else:
            k = i - 1
            layer(block.child("conv0"), f"convs.{2 * k}", f"{where}.conv0", 2 * k + 1)
            layer(block.child("conv1"), f"convs.{2 * k + 1}", f"{where}.conv1", 2 * k + 2)
            layer(block.child("torgb"), f"to_rgbs.{k}", f"{where}.torgb", None)
    # noise buffers of layers without noise: fix their size to the layer resolution
    for j in range(2 * len(blocks) - 1):
        key = f"noises.noise_{j}"
        side = 4 * 2 ** ((j + 1) // 2)
        if state[key].shape[-1] != side:
            state[key] = torch.zeros(1, 1, side, side)
    return state, {"lr_mlp": lr_mlp, "conv_clamp": clamp}


def load_nvidia_generator_state(path: str | Path):
    """(rosinality-named state, GeneratorConfig) of the `G_ema` in an NVIDIA pickle."""
    from model.stylegan2 import infer_config

    source = str(path)
    G = _find_generator(read_pickle(path), source)
    state, extra = nvidia_to_state(G, source)
    cfg = replace(infer_config(state, source), **extra)
    return state, cfg
