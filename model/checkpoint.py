"""Checkpoint IO that never executes code from a file.

This project writes safetensors + a JSON config beside it (`x.safetensors` and
`x.json`), atomically (temp file + rename). Foreign `.pt`/`.pth` files load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load inside the functions: importing this module
    import torch  # stays cheap (the CLI imports CheckpointError on every start)


class CheckpointError(ValueError):
    """A file that is not the checkpoint it should be; the message names the file."""


def fingerprint(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """sha256 over the config (canonical JSON) and every tensor (sorted keys, raw bytes)."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_path(path: str | Path) -> Path:
    """The JSON config that sits beside a safetensors file."""
    return Path(path).with_suffix(".json")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> None:
    """Write `path` (safetensors) and its JSON config, each atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(config_path(path), json.dumps(dict(config), indent=2).encode())


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file and the JSON config beside it."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = config_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not cfg.exists():
        raise CheckpointError(f"{path}: its config {cfg.name} is missing beside it")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from None
    return state, config


def torch_load_safe(path: str | Path) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers, no code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal says it all
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        why = next((x for x in lines if x.startswith("Unsupported")), None)
        raise CheckpointError(
            f"{path}: cannot be loaded as a weights-only torch checkpoint (refused, nothing in "
            f"it was run: {why or (lines[0] if lines else type(exc).__name__)})"
        ) from None


def check_state_fits(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: Any, what: str
) -> None:
    """Refuse `state` unless its keys and shapes are exactly those of `own` (a module's
    state dict, possibly on the meta device). The error names the file and what it was
    loaded as."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit {what}: {len(missing)} missing (e.g. {missing[:4]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})"
        )
    for key, ref in own.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {list(state[key].shape)}, expected "
                f"{list(ref.shape)}: the weights do not fit {what}"
            )
