"""The shapes world: procedural 32 px images whose truth is known.

One scene = one shape (circle / square / triangle) of one colour and size on one
background, plus jitter (position, scale, rotation, colour offsets). Every scene is
drawn from its own RNG seeded by (world seed, row), so row i does not depend on
how many rows are rendered. `counterfactual(scene, attribute, value)` keeps every
jitter value and changes one attribute: the ground truth an edit should reach.

Rendering is analytic inside-tests on a supersampled grid, box-filtered down
(antialiasing); the same scene always gives the same uint8 pixels.

The `world` stage writes `{id}.png` files (what the ingest stage reads) and
`labels.json` (attributes, jitter, a caption per row).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.config import require

# --- the world's vocabulary -------------------------------------------------

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "background", "size")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 215, 180),
}
# Shape extent per unit radius r: circle radius r, square half-side 0.9 r,
# triangle (equilateral, apex up) circumradius 1.3 r.
SQUARE_HALF = 0.9
TRIANGLE_CIRCUM = 1.3
MAX_EXTENT = max(1.0, SQUARE_HALF * math.sqrt(2.0), TRIANGLE_CIRCUM)  # farthest point / r
# area / r^2 for each shape (used by the judge to read size from area)
AREA_PER_R2: dict[str, float] = {
    "circle": math.pi,
    "square": (2 * SQUARE_HALF) ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * TRIANGLE_CIRCUM**2,
}

# Words the captions use (the first is the canonical name) ...
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc"),
        "square": ("square", "block"),
        "triangle": ("triangle", "wedge"),
    },
    "color": {
        "red": ("red", "crimson"),
        "green": ("green", "emerald"),
        "blue": ("blue", "navy"),
        "yellow": ("yellow", "golden"),
        "purple": ("purple", "violet"),
        "orange": ("orange", "tangerine"),
    },
    "background": {
        "white": ("white", "bright white"),
        "black": ("black", "dark"),
        "gray": ("gray", "grey"),
        "beige": ("beige", "cream"),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big")},
}
# ... and words they never use: held out for zero-shot evaluation only.
HELD_OUT_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"circle": ("dot",), "square": ("tile",), "triangle": ("pyramid",)},
    "color": {
        "red": ("scarlet",),
        "green": ("jade",),
        "blue": ("azure",),
        "yellow": ("lemon",),
        "purple": ("lilac",),
        "orange": ("amber",),
    },
    "background": {
        "white": ("snowy",),
        "black": ("ebony",),
        "gray": ("slate",),
        "beige": ("sand",),
    },
    "size": {"small": ("mini",), "large": ("huge",)},
}
TEMPLATES: tuple[str, ...] = (
    "{a} {obj}{bg}",
    "a picture of {a} {obj}{bg}",
    "an image of {a} {obj}{bg}",
    "{obj}{bg}",
)
BG_PHRASES: tuple[str, ...] = (" on {a} {b} background", " against {a} {b} background", " on {b}")


def attribute_values(attribute: str) -> tuple[str, ...]:
    """Every value the world knows for one attribute."""
    table = {
        "shape": SHAPES,
        "color": tuple(COLORS),
        "background": tuple(BACKGROUNDS),
        "size": SIZES,
    }
    if attribute not in table:
        raise ValueError(f"unknown attribute {attribute!r}: expected one of {ATTRIBUTES}")
    return table[attribute]


# --- config -------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """`world:` in params. Defaults = the tiny world the pipeline runs on."""

    seed: int = 0
    n_images: int = 512
    resolution: int = 32
    supersample: int = 4  # antialiasing: render at resolution * supersample, box-filter down
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    radius_small: float = 4.5  # px at `resolution`
    radius_large: float = 8.0
    scale_jitter: float = 0.05  # radius x U(1 - j, 1 + j)
    position_jitter: float = 4.0  # centre = canvas centre + U(-j, j) px on each axis
    rotation_jitter: float = 15.0  # degrees, squares and triangles
    color_jitter: int = 12  # per-channel offset U{-j..j} on the shape colour
    background_jitter: int = 6
    keep_attribute: float = 0.7  # probability a caption mentions each attribute
    # probability a caption also says where the shape is ("at the top left", "in the
    # centre"; thirds of the position jitter): 0 = never (captions as before); a CLIP
    # trained with it encodes position, which captions of attributes alone leave out
    position_words: float = 0.0
    out_dir: str = "data/world"

    def validate(self) -> None:
        require(self.n_images >= 1, "n_images", self.n_images, "an integer >= 1")
        require(self.resolution >= 8, "resolution", self.resolution, "an integer >= 8")
        require(self.supersample >= 1, "supersample", self.supersample, "an integer >= 1")
        for key, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(COLORS)),
            ("backgrounds", self.backgrounds, tuple(BACKGROUNDS)),
        ):
            require(len(values) >= 1, key, values, f"at least one of {list(known)}")
            for v in values:
                require(v in known, key, v, f"one of {list(known)}")
            require(len(set(values)) == len(values), key, values, "no repeated values")
        require(self.radius_small > 0.5, "radius_small", self.radius_small, "a radius > 0.5 px")
        require(
            self.radius_large > self.radius_small,
            "radius_large",
            self.radius_large,
            f"a radius > radius_small ({self.radius_small})",
        )
        require(
            0 <= self.scale_jitter < 0.5, "scale_jitter", self.scale_jitter, "a number in [0, 0.5)"
        )
        require(self.position_jitter >= 0, "position_jitter", self.position_jitter, "a number >= 0")
        require(self.rotation_jitter >= 0, "rotation_jitter", self.rotation_jitter, "a number >= 0")
        require(0 <= self.color_jitter <= 40, "color_jitter", self.color_jitter, "0..40")
        require(
            0 <= self.background_jitter <= 40, "background_jitter", self.background_jitter, "0..40"
        )
        require(
            0 <= self.position_words <= 1,
            "position_words",
            self.position_words,
            "a probability in [0, 1]",
        )
        require(
            0 < self.keep_attribute <= 1,
            "keep_attribute",
            self.keep_attribute,
            "a number in (0, 1]",
        )
        # The largest shape, at any position, must stay inside the canvas (1 px margin)
        # so that a counterfactual size change never leaves the canvas.
        extent = self.radius_large * (1 + self.scale_jitter) * MAX_EXTENT
        room = self.resolution / 2 - self.position_jitter - 1.0
        require(
            extent <= room,
            "radius_large",
            self.radius_large,
            f"a radius whose shape fits the {self.resolution} px canvas: farthest point "
            f"{extent:.1f} px from the centre > {room:.1f} px of room "
            f"(resolution / 2 - position_jitter - 1)",
        )


# --- scenes -------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One image's truth: attributes + jitter. Coordinates in px of the output image."""

    shape: str
    color: str
    background: str
    size: str
    cx: float
    cy: float
    scale: float  # multiplies the size's base radius
    rotation: float  # degrees
    color_offset: tuple[int, int, int] = (0, 0, 0)
    background_offset: tuple[int, int, int] = (0, 0, 0)

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["color_offset"] = tuple(int(v) for v in kw.get("color_offset", (0, 0, 0)))
        kw["background_offset"] = tuple(int(v) for v in kw.get("background_offset", (0, 0, 0)))
        return cls(**kw)


def sample_scene(cfg: WorldConfig, row: int) -> Scene:
    """Row `row` of world `cfg.seed`: its own RNG, independent of the other rows."""
    rng = np.random.default_rng([cfg.seed, row])
    shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
    color = cfg.colors[int(rng.integers(len(cfg.colors)))]
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    size = SIZES[int(rng.integers(2))]
    c = cfg.resolution / 2
    cx, cy = (c + rng.uniform(-cfg.position_jitter, cfg.position_jitter, size=2)).tolist()
    scale = float(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
    rotation = float(rng.uniform(-cfg.rotation_jitter, cfg.rotation_jitter))
    cj, bj = cfg.color_jitter, cfg.background_jitter
    color_offset = tuple(int(v) for v in rng.integers(-cj, cj + 1, size=3))
    background_offset = tuple(int(v) for v in rng.integers(-bj, bj + 1, size=3))
    return Scene(
        shape, color, background, size, cx, cy, scale, rotation, color_offset, background_offset
    )


def counterfactual(scene: Scene, attribute: str, value: str) -> Scene:
    """The same scene (position, scale, rotation, colour offsets) with one attribute changed."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}: expected one of {ATTRIBUTES}")
    if value not in attribute_values(attribute):
        raise ValueError(
            f"unknown {attribute} {value!r}: expected one of {attribute_values(attribute)}"
        )
    return dataclasses.replace(scene, **{attribute: value})


def radius(scene: Scene, cfg: WorldConfig) -> float:
    base = cfg.radius_large if scene.size == "large" else cfg.radius_small
    return base * scene.scale


# --- rendering ----------------------------------------------------------------


def coverage(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """Fraction of each output pixel the shape covers: [H, W] float32 in [0, 1]."""
    n, k = cfg.resolution * cfg.supersample, cfg.supersample
    t = (np.arange(n, dtype=np.float64) + 0.5) / k  # sample positions in output px
    x, y = np.meshgrid(t - scene.cx, t - scene.cy)  # [n, n] each, y grows downwards
    r = radius(scene, cfg)
    a = math.radians(scene.rotation)
    u = x * math.cos(a) + y * math.sin(a)  # scene-frame coordinates
    v = -x * math.sin(a) + y * math.cos(a)
    if scene.shape == "circle":
        inside = u * u + v * v <= r * r
    elif scene.shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF * r
    elif scene.shape == "triangle":
        inradius = TRIANGLE_CIRCUM * r / 2
        inside = np.ones_like(u, dtype=bool)
        for k_edge in range(3):  # outward edge normals: down, and +-120 degrees from it
            phi = math.pi / 2 + k_edge * 2 * math.pi / 3
            inside &= u * math.cos(phi) + v * math.sin(phi) <= inradius
    else:
        raise ValueError(f"unknown shape {scene.shape!r}: expected one of {SHAPES}")
    res = cfg.resolution
    return inside.reshape(res, k, res, k).mean(axis=(1, 3)).astype(np.float32)


def scene_colors(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(shape RGB, background RGB) as float arrays in 0..255, jitter applied."""
    if scene.color not in COLORS:
        raise ValueError(f"unknown color {scene.color!r}: expected one of {list(COLORS)}")
    if scene.background not in BACKGROUNDS:
        raise ValueError(
            f"unknown background {scene.background!r}: expected one of {list(BACKGROUNDS)}"
        )
    fg = np.clip(np.add(COLORS[scene.color], scene.color_offset), 0, 255).astype(np.float32)
    bg = np.clip(np.add(BACKGROUNDS[scene.background], scene.background_offset), 0, 255)
    return fg, bg.astype(np.float32)


def render(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """One scene -> [H, W, 3] uint8 RGB."""
    fg, bg = scene_colors(scene)
    alpha = coverage(scene, cfg)[..., None]
    img = bg * (1 - alpha) + fg * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_many(scenes: list[Scene], cfg: WorldConfig) -> np.ndarray:
    """[N, H, W, 3] uint8."""
    res = cfg.resolution
    out = np.empty((len(scenes), res, res, 3), np.uint8)
    for i, s in enumerate(scenes):
        out[i] = render(s, cfg)
    return out


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the models' input range)."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def from_unit(x: np.ndarray) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] (clamped) -> uint8 [N, H, W, 3]."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).transpose(0, 2, 3, 1).astype(np.uint8)


# --- captions -------------------------------------------------------------------


@dataclass(frozen=True)
class Caption:
    text: str
    attributes: dict[str, str] = field(default_factory=dict)  # the ones it mentions
    region: tuple[str, str] | None = None  # (vertical, horizontal) it names, see region_of
    # (position jitter, resolution) the region is read in (sample_caption sets the world's)
    frame: tuple[float, int] = (WorldConfig.position_jitter, WorldConfig.resolution)

    def fits(self, scene: Scene) -> bool:
        """True when everything the caption says is true of the scene."""
        if self.region is not None and region_of(scene, *self.frame) != self.region:
            return False
        return all(getattr(scene, a) == v for a, v in self.attributes.items())


def region_of(scene: Scene, jitter: float, resolution: int) -> tuple[str, str]:
    """(vertical, horizontal) third of the position jitter the shape's centre lies in:
    ("top" | "" | "bottom", "left" | "" | "right"); "" = the middle third."""
    third = jitter / 3

    def side(offset: float, low: str, high: str) -> str:
        return low if offset < -third else high if offset > third else ""

    c = resolution / 2
    return side(scene.cy - c, "top", "bottom"), side(scene.cx - c, "left", "right")


def region_phrase(vertical: str, horizontal: str) -> str:
    """ " at the top left", " on the right", " in the centre"."""
    if not vertical and not horizontal:
        return " in the centre"
    if not vertical:
        return f" on the {horizontal}"
    return f" at the {' '.join(w for w in (vertical, horizontal) if w)}"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def phrase(
    attributes: dict[str, str],
    words: dict[str, str] | None = None,
    template: int = 0,
    bg_phrase: int = 0,
) -> str:
    """Text for a set of attributes; `words` overrides the word used for an attribute."""
    words = words or {}
    w = {a: words.get(a, SYNONYMS[a][v][0]) for a, v in attributes.items()}
    obj_words = [w[a] for a in ("size", "color") if a in w]
    obj_words.append(w.get("shape", "shape"))
    obj = " ".join(obj_words)
    bg = ""
    if "background" in w:
        bg = BG_PHRASES[bg_phrase].format(a=_article(w["background"]), b=w["background"])
    tpl = TEMPLATES[template]
    return tpl.format(a=_article(obj), obj=obj, bg=bg)


def sample_caption(
    scene: Scene,
    rng: np.random.Generator,
    keep: float = 0.7,
    position: float = 0.0,
    world: WorldConfig | None = None,
) -> Caption:
    """A caption true of the scene: each attribute kept with probability `keep` (at least
    one), one of its training synonyms, a random template; with probability `position`
    (drawn only when > 0, so captions without it are unchanged) where the shape lies."""
    kept = [a for a in ATTRIBUTES if rng.random() < keep]
    if not kept:
        kept = [ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]]
    attrs = {a: getattr(scene, a) for a in kept}
    words = {}
    for a, v in attrs.items():
        options = SYNONYMS[a][v]
        words[a] = options[int(rng.integers(len(options)))]
    text = phrase(
        attrs,
        words,
        template=int(rng.integers(len(TEMPLATES))),
        bg_phrase=int(rng.integers(len(BG_PHRASES))),
    )
    if position > 0 and rng.random() < position:
        world = world or WorldConfig()
        vertical, horizontal = region_of(scene, world.position_jitter, world.resolution)
        text += region_phrase(vertical, horizontal)
        frame = (world.position_jitter, world.resolution)
        return Caption(text, attrs, (vertical, horizontal), frame)
    return Caption(text, attrs)


def zero_shot_prompts(attribute: str, held_out: bool = False) -> dict[str, str]:
    """value -> prompt naming only that attribute (canonical or held-out word)."""
    table = HELD_OUT_SYNONYMS if held_out else SYNONYMS
    return {
        v: phrase({attribute: v}, {attribute: table[attribute][v][0]})
        for v in attribute_values(attribute)
    }


# --- the stage ------------------------------------------------------------------


def row_id(row: int) -> str:
    return f"{row:06d}"


def scenes(cfg: WorldConfig, start: int = 0, n: int | None = None) -> list[Scene]:
    n = cfg.n_images if n is None else n
    return [sample_scene(cfg, start + i) for i in range(n)]


def run(cfg: WorldConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Render `cfg.n_images` scenes into `out_dir` (PNG per row + labels.json).

    Deterministic by `cfg.seed`. Returns a summary dict.
    """
    from PIL import Image
    from tqdm import tqdm

    cfg.validate()
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(cfg.n_images), desc="world render", disable=not progress, unit="img"):
        scene = sample_scene(cfg, i)
        caption = sample_caption(
            scene,
            np.random.default_rng([cfg.seed, i, 1]),
            cfg.keep_attribute,
            cfg.position_words,
            cfg,
        )
        name = f"{row_id(i)}.png"
        Image.fromarray(render(scene, cfg)).save(out / name, optimize=False)
        rows.append(
            {
                "id": row_id(i),
                "file": name,
                **scene.to_dict(),
                "caption": caption.text,
                "caption_attributes": caption.attributes,
            }
        )
    labels = {"world": dataclasses.asdict(cfg), "n_images": cfg.n_images, "rows": rows}
    tmp = out / ".labels.json.tmp"
    tmp.write_text(json.dumps(labels, indent=1))
    tmp.replace(out / "labels.json")
    summary = {"rows": cfg.n_images, "out_dir": str(out)}
    if progress:
        print(f"world: rendered {cfg.n_images} images ({cfg.resolution} px) into {out}")
    return summary


def load_labels(folder: str | Path) -> tuple[WorldConfig, list[Scene], list[dict]]:
    """(world config, scenes, raw rows) from a folder written by `run`."""
    path = Path(folder) / "labels.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no labels (run `deltaedit world render` first)")
    data = json.loads(path.read_text())
    w = data["world"]
    for key in ("shapes", "colors", "backgrounds"):
        w[key] = tuple(w[key])
    cfg = WorldConfig(**w)
    return cfg, [Scene.from_dict(r) for r in data["rows"]], data["rows"]
