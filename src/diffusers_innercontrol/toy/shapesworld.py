# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""ShapesWorld: a procedural, seeded toy world of captioned images with an exact control for every task.

Each scene holds 1 to 3 shapes (circle, square, triangle, star, ellipse; 8 colours; small or large; anywhere
in the frame, overlapping, drawn in a stacking order) on a background (flat colour, gradient, stripes or a
checkerboard, in one of the same 8 colours). Everything is drawn with numpy at `supersample` x the output
resolution and box-averaged down (antialiasing), so a sample takes a few milliseconds. Because the scene is
known, the controls are exact rather than estimated by an annotator:

- `hed` (soft edges): the boundaries between the *visible* regions (background and each shape's visible
  part), a band about 2 px wide blurred by a truncated Gaussian; white on black, max 1. Exactly 0 farther
  than about 4 px from a boundary; the frame border is not an edge.
- `lineart` (thin lines): the same boundaries as an antialiased line about 1 px wide; white on black.
- `control_depth`: brighter is nearer. The background is a vertical ramp (far at the top, `0.05`, to
  `0.35` at the bottom, like a floor); the k-th shape of the stacking order (k = 0 drawn first) is a flat
  `0.55 + 0.2 * k`, so a shape drawn on top is always nearer than what it covers.
- `control_seg`: the class map rendered in the ADE20K palette used by the project's segmentation controls
  (`diffusers_innercontrol.palette`), and `classes`, the raw `(H, W)` uint8 class map. ADE20K (150 classes,
  0-based) has no "circle": each shape kind borrows an ADE20K class whose palette colour is distinct and
  whose object is alike (`SEGMENTATION_CLASSES`): background -> 0 `wall`, circle -> 119 `ball`,
  square -> 41 `box`, triangle -> 114 `tent`, star -> 149 `flag`, ellipse -> 142 `plate`.

Captions use a small fixed vocabulary (`VOCABULARY`): the shapes in stacking order, each `a {size} {colour}
{kind}`, each joined to the previous one by its relation to it (`above`, `below`, `left of`, `right of`, or
`behind` when the two overlap: the earlier one is behind), then `on a {colour} [gradient|striped|checkered]
background`, e.g. "a small red circle above a large blue square on a green gradient background".

API:
    ShapesWorld(size=64, seed=0, supersample=4)
        .sample(index, with_controls=True) -> dict(image, text, prompt, hed, lineart, control_depth,
            control_seg (PIL RGB), classes (H, W) uint8, instances (H, W) uint8 (0 background, k+1 shape k),
            scene (Scene))   -- deterministic per (seed, index)
        .make_scene(index) -> Scene; .render(scene, with_controls=True) -> dict as above
        .as_dataset(n, start=0, columns=None, streaming=False) -> datasets.Dataset | IterableDataset
        .save_imagefolder(path, n, start=0, columns=None) -> path  (PNGs + metadata.jsonl, `--train_data_dir`)
        ShapesWorld is also a map-style dataset: world[i] == world.sample(i), len(world) == `length`.
    Scene, Shape, Background (dataclasses), caption_for(scene) -> str
    write_word_tokenizer(path) -> path  (CLIPTokenizer-loadable; every caption word is one token)
    VOCABULARY, SHAPE_KINDS, COLOURS, BACKGROUND_STYLES, SEGMENTATION_CLASSES, CONTROL_COLUMNS
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHAPE_KINDS = ("circle", "square", "triangle", "star", "ellipse")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
# size parameter (circumradius, as a fraction of the image side) of each size word
SIZE_RANGES = {"small": (0.09, 0.13), "large": (0.17, 0.23)}
BACKGROUND_STYLES = ("plain", "gradient", "striped", "checkered")
RELATIONS = ("above", "below", "left of", "right of", "behind")

# ADE20K class ids (0-based, 150 classes) used for the segmentation control; see the module docstring.
BACKGROUND_CLASS = 0  # wall
SEGMENTATION_CLASSES: Dict[str, int] = {"background": 0, "circle": 119, "square": 41, "triangle": 114, "star": 149, "ellipse": 142}
SEGMENTATION_CLASS_NAMES: Dict[int, str] = {0: "wall", 119: "ball", 41: "box", 114: "tent", 149: "flag", 142: "plate"}

# depth values (brighter = nearer)
DEPTH_BACKGROUND = (0.05, 0.35)  # top, bottom of the background ramp
DEPTH_FIRST_SHAPE = 0.55
DEPTH_STEP = 0.2

CONTROL_COLUMNS = ("hed", "lineart", "control_depth", "control_seg")
ALL_COLUMNS = ("image", "text", "prompt") + CONTROL_COLUMNS + ("classes",)

MAX_SHAPES = 3
MIN_VISIBLE_FRACTION = 0.5  # every shape keeps at least this share of its area visible


def _vocabulary() -> Tuple[str, ...]:
    words = ["a", "on", "background", "of"]
    words += list(SIZES) + list(COLOURS) + list(SHAPE_KINDS)
    words += [w for rel in RELATIONS for w in rel.split()]
    words += [s for s in BACKGROUND_STYLES if s != "plain"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


VOCABULARY = _vocabulary()


# ------------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Shape:
    """One shape. Coordinates in output pixels (x right, y down); `radius` is the circumradius."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0  # radians, counter-clockwise on screen

    def __post_init__(self):
        if self.kind not in SHAPE_KINDS:
            raise ValueError(f"Unknown shape kind {self.kind!r}: choose one of {SHAPE_KINDS}.")
        if self.colour not in COLOURS:
            raise ValueError(f"Unknown colour {self.colour!r}: choose one of {tuple(COLOURS)}.")
        if self.size not in SIZES:
            raise ValueError(f"Unknown size {self.size!r}: choose one of {SIZES}.")
        if self.radius <= 0:
            raise ValueError(f"The radius must be > 0, got {self.radius}.")


@dataclass(frozen=True)
class Background:
    """The background: a colour and a style; `angle` orients gradients and stripes, `period` (px) stripes and checks."""

    colour: str
    style: str = "plain"
    angle: float = 0.0
    period: float = 12.0

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"Unknown background colour {self.colour!r}: choose one of {tuple(COLOURS)}.")
        if self.style not in BACKGROUND_STYLES:
            raise ValueError(f"Unknown background style {self.style!r}: choose one of {BACKGROUND_STYLES}.")


@dataclass(frozen=True)
class Scene:
    """A background and the shapes in stacking order (the first is drawn first, i.e. farthest)."""

    background: Background
    shapes: Tuple[Shape, ...] = field(default_factory=tuple)


def _relation(a: Shape, b: Shape, overlap: bool) -> str:
    """Where `a` is relative to `b` (b comes after a in the stacking order)."""
    if overlap:
        return "behind"
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def caption_for(scene: Scene, overlaps: Optional[Sequence[bool]] = None) -> str:
    """
    The caption of `scene`.

    Args:
        scene: the scene.
        overlaps: for each consecutive pair of shapes (i, i+1), whether they overlap; computed from the
            geometry when None.
    """
    shapes = scene.shapes
    if overlaps is None:
        overlaps = [_shapes_overlap(shapes[i], shapes[i + 1]) for i in range(len(shapes) - 1)]
    parts = []
    for i, s in enumerate(shapes):
        if i > 0:
            parts.append(_relation(shapes[i - 1], s, overlaps[i - 1]))
        parts.append(f"a {s.size} {s.colour} {s.kind}")
    bg = scene.background
    style = "" if bg.style == "plain" else f" {bg.style}"
    parts.append(f"on a {bg.colour}{style} background")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------ geometry
def _polygon(s: Shape) -> Optional[np.ndarray]:
    """Vertices (N, 2) of a polygonal shape (x, y in pixels), None for round shapes."""
    if s.kind == "square":
        ts = np.pi / 4 + np.arange(4) * np.pi / 2
        r = s.radius
    elif s.kind == "triangle":
        ts = np.pi / 2 + np.arange(3) * 2 * np.pi / 3  # pointing up at angle 0
        r = s.radius
    elif s.kind == "star":
        ts = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, s.radius, s.radius * 0.45)
    else:
        return None
    ts = ts + s.angle
    # screen y points down: a counter-clockwise angle on screen is -y
    return np.stack([s.cx + r * np.cos(ts), s.cy - r * np.sin(ts)], axis=-1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the points (x, y)."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def shape_mask(s: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (x, y) (pixel coordinates, any shape) inside shape `s`."""
    if s.kind == "circle":
        return (x - s.cx) ** 2 + (y - s.cy) ** 2 <= s.radius**2
    if s.kind == "ellipse":
        c, sn = np.cos(s.angle), np.sin(s.angle)
        u = (x - s.cx) * c - (y - s.cy) * sn
        v = (x - s.cx) * sn + (y - s.cy) * c
        return (u / s.radius) ** 2 + (v / (0.55 * s.radius)) ** 2 <= 1.0
    return _inside_polygon(x, y, _polygon(s))


def shape_area(s: Shape) -> float:
    """The exact area of shape `s` in square pixels."""
    r = s.radius
    if s.kind == "circle":
        return float(np.pi * r * r)
    if s.kind == "ellipse":
        return float(np.pi * r * 0.55 * r)
    p = _polygon(s)  # shoelace formula (the star polygon is simple)
    return float(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))))


def _sample_grid(size: int, ss: int):
    c = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    return np.meshgrid(c, c)  # x, y


def _shapes_overlap(a: Shape, b: Shape, resolution: int = 4) -> bool:
    """Whether two shapes share a sample point of the `resolution`-per-pixel grid (the renderer's, by default)."""
    if (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 > (a.radius + b.radius) ** 2:
        return False
    lo_x, hi_x = max(a.cx - a.radius, b.cx - b.radius), min(a.cx + a.radius, b.cx + b.radius)
    lo_y, hi_y = max(a.cy - a.radius, b.cy - b.radius), min(a.cy + a.radius, b.cy + b.radius)
    if lo_x >= hi_x or lo_y >= hi_y:
        return False
    xs = np.arange(np.floor(lo_x * resolution), np.ceil(hi_x * resolution)) / resolution + 0.5 / resolution
    ys = np.arange(np.floor(lo_y * resolution), np.ceil(hi_y * resolution)) / resolution + 0.5 / resolution
    x, y = np.meshgrid(xs, ys)
    return bool(np.any(shape_mask(a, x, y) & shape_mask(b, x, y)))


# ------------------------------------------------------------------------------------------------ pixels
def _box_down(a: np.ndarray, ss: int) -> np.ndarray:
    """Average `ss` x `ss` blocks of a (H*ss, W*ss[, C]) array."""
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


def _shift_max(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Max over a window of +-r along `axis` (the frame is padded with zeros)."""
    out = a.copy()
    n = a.shape[axis]
    for d in range(1, r + 1):
        if d >= n:
            break
        lo = [slice(None)] * a.ndim
        hi = [slice(None)] * a.ndim
        lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
        np.maximum(out[tuple(lo)], a[tuple(hi)], out=out[tuple(lo)])
        np.maximum(out[tuple(hi)], a[tuple(lo)], out=out[tuple(hi)])
    return out


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilate a 2-D array by a (2r+1) x (2r+1) square (separable max filter; numpy only)."""
    return _shift_max(_shift_max(mask, r, 0), r, 1)


def region_boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean map of the pixels whose right or lower neighbour has another label (one-sided, 1 px thick)."""
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def _blur(a: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian blur truncated at `radius` px (so its support is exactly finite), zero padding."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(a, radius)
    h, w = a.shape
    rows = sum(k[i] * pad[:, i : i + w] for i in range(2 * radius + 1))  # (h + 2r, w)
    return sum(k[i] * rows[i : i + h, :] for i in range(2 * radius + 1))


def _tone(rgb: np.ndarray, amount: float) -> np.ndarray:
    """A lighter (dark colours) or darker (light colours) tone of `rgb`."""
    if rgb.mean() < 110:
        return rgb + (255.0 - rgb) * amount
    return rgb * (1.0 - amount)


def _background(bg: Background, size: int, ss: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    base = np.asarray(COLOURS[bg.colour], dtype=np.float64)
    u = ((x - size / 2) * np.cos(bg.angle) + (y - size / 2) * np.sin(bg.angle)) / size + 0.5  # ~[0, 1]
    if bg.style == "plain":
        t = np.zeros_like(x)
        amount = 0.0
    elif bg.style == "gradient":
        t = np.clip(u, 0.0, 1.0)
        amount = 0.45
    elif bg.style == "striped":
        t = (np.floor(u * size / (bg.period / 2)) % 2).astype(np.float64)
        amount = 0.22
    else:  # checkered
        t = ((np.floor(x / bg.period) + np.floor(y / bg.period)) % 2).astype(np.float64)
        amount = 0.22
    other = _tone(base, amount)
    return base[None, None, :] * (1.0 - t[..., None]) + other[None, None, :] * t[..., None]


def _to_pil(a: np.ndarray):
    from PIL import Image

    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return Image.fromarray(a, mode="RGB")


_PALETTE_CACHE: Dict[str, np.ndarray] = {}


def segmentation_palette() -> np.ndarray:
    """The ADE20K palette (150, 3) uint8 of the project's segmentation controls (`diffusers_innercontrol.palette`)."""
    if "ade" not in _PALETTE_CACHE:
        from ..palette import ade20k_palette

        _PALETTE_CACHE["ade"] = np.asarray(ade20k_palette(), dtype=np.uint8).reshape(-1, 3)
    return _PALETTE_CACHE["ade"]


def classes_to_rgb(classes: np.ndarray) -> np.ndarray:
    """
    Colour-code a class map (H, W) of ADE20K ids with the palette -> (H, W, 3) uint8.

    The same colours as `palette.classes_to_control`, indexed in numpy (no float round trip), and
    `palette.control_to_classes` maps them back to `classes` exactly (the shapes' classes have unique colours).
    """
    return segmentation_palette()[np.asarray(classes, dtype=np.int64)]


# ------------------------------------------------------------------------------------------------ the world
class ShapesWorld:
    """
    The ShapesWorld data set: sample `index` of a world is a fixed function of `(seed, index)`.

    Args:
        size: the image side in pixels (64 by default; 128 works as well; at least 32, a multiple of 8).
        seed: the world's seed; two worlds with different seeds are independent data sets.
        supersample: samples per pixel along each axis for antialiasing (4: 16 samples per pixel).
        length: what `len(world)` reports when it is used as a map-style data set.
    """

    def __init__(self, size: int = 64, seed: int = 0, supersample: int = 4, length: int = 10_000):
        if size < 32 or size % 8:
            raise ValueError(f"size must be a multiple of 8 and at least 32 (64 or 128 are the usual), got {size}.")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}.")
        self.size = int(size)
        self.seed = int(seed)
        self.supersample = int(supersample)
        self.length = int(length)
        self._grid = _sample_grid(self.size, self.supersample)

    def __len__(self):
        return self.length

    def __getitem__(self, index: int) -> Dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesWorld of length {self.length}.")
        return self.sample(index)

    def __repr__(self):
        return f"ShapesWorld(size={self.size}, seed={self.seed}, supersample={self.supersample})"

    # -------------------------------------------------------------------- scenes
    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}.")
        return np.random.default_rng([self.seed, int(index), 0x5A7E5])

    def make_scene(self, index: int) -> Scene:
        """The scene of sample `index` (background and shapes in stacking order)."""
        rng = self._rng(index)
        S = self.size
        colours = list(COLOURS)
        bg = Background(
            colour=colours[rng.integers(len(colours))],
            style=BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))],
            angle=float(rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4]) + rng.uniform(-0.1, 0.1)),
            period=float(S * rng.uniform(0.12, 0.22)),
        )
        n = int(rng.integers(1, MAX_SHAPES + 1))
        for _attempt in range(100):
            shapes = []
            for _ in range(n):
                size = SIZES[rng.integers(len(SIZES))]
                lo, hi = SIZE_RANGES[size]
                r = float(S * rng.uniform(lo, hi))
                kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
                colour = [c for c in colours if c != bg.colour][rng.integers(len(colours) - 1)]
                if kind == "ellipse":
                    angle = float(rng.uniform(0, np.pi))
                else:
                    angle = float(rng.uniform(-0.3, 0.3))
                cx = float(rng.uniform(r + 1, S - r - 1))
                cy = float(rng.uniform(r + 1, S - r - 1))
                shapes.append(Shape(kind, colour, size, cx, cy, r, angle))
            scene = Scene(bg, tuple(shapes))
            if self._visible_enough(scene):
                return scene
        return Scene(bg, tuple(shapes[:1]))  # practically never: one shape is always visible

    def _visible_enough(self, scene: Scene) -> bool:
        if len(scene.shapes) < 2:
            return True
        x, y = _sample_grid(self.size, 2)
        inst = np.zeros(x.shape, dtype=np.uint8)
        masks = [shape_mask(s, x, y) for s in scene.shapes]
        for k, m in enumerate(masks):
            inst[m] = k + 1
        return all((inst == k + 1).sum() >= MIN_VISIBLE_FRACTION * m.sum() for k, m in enumerate(masks))

    # -------------------------------------------------------------------- rendering
    def render(self, scene: Scene, with_controls: bool = True) -> Dict:
        """
        Draw `scene` and its controls.

        Returns:
            dict with `image`, `text` (and its alias `prompt`), `scene`, and with `with_controls`: `hed`,
            `lineart`, `control_depth`, `control_seg` (PIL RGB), `classes` and `instances` ((H, W) uint8).
        """
        S, ss = self.size, self.supersample
        x, y = self._grid
        img = _background(scene.background, S, ss, x, y)
        inst = np.zeros(x.shape, dtype=np.uint8)
        masks = []
        for k, s in enumerate(scene.shapes):
            m = shape_mask(s, x, y)
            masks.append(m)
            img[m] = COLOURS[s.colour]
            inst[m] = k + 1
        overlaps = [bool(np.any(masks[i] & masks[i + 1])) for i in range(len(masks) - 1)]
        text = caption_for(scene, overlaps)
        out = {"image": _to_pil(_box_down(img, ss)), "text": text, "prompt": text, "scene": scene}
        if not with_controls:
            return out

        # visible instance of each output pixel: the one covering most of its sub-samples
        n = len(scene.shapes) + 1
        counts = np.stack([_box_down((inst == k).astype(np.float32), ss) for k in range(n)])
        instances = counts.argmax(axis=0).astype(np.uint8)
        lut = np.array([BACKGROUND_CLASS] + [SEGMENTATION_CLASSES[s.kind] for s in scene.shapes], dtype=np.uint8)
        classes = lut[instances]

        # edges between visible regions, found on the supersampled instance map
        boundary = region_boundaries(inst).astype(np.float32)
        lineart = np.clip(_box_down(dilate(boundary, ss // 2), ss), 0.0, 1.0)
        soft = _box_down(dilate(boundary, ss), ss)
        hed = _blur(soft, sigma=0.8, radius=2)
        hed = hed / hed.max() if hed.max() > 0 else hed

        # depth: background ramp (far at the top), shapes by stacking order
        depth = DEPTH_BACKGROUND[0] + (DEPTH_BACKGROUND[1] - DEPTH_BACKGROUND[0]) * (y / S)
        for k in range(len(scene.shapes)):
            depth[inst == k + 1] = DEPTH_FIRST_SHAPE + DEPTH_STEP * k
        depth = _box_down(depth, ss)

        out.update(
            hed=_to_pil(hed * 255.0),
            lineart=_to_pil(lineart * 255.0),
            control_depth=_to_pil(depth * 255.0),
            control_seg=_to_pil(classes_to_rgb(classes).astype(np.float64)),
            classes=classes,
            instances=instances,
        )
        return out

    def sample(self, index: int, with_controls: bool = True) -> Dict:
        """Sample `index`: `render(make_scene(index))`; identical for identical `(seed, index)`."""
        return self.render(self.make_scene(index), with_controls=with_controls)

    # -------------------------------------------------------------------- datasets
    @staticmethod
    def _check_columns(columns: Optional[Sequence[str]]) -> Tuple[str, ...]:
        if columns is None:
            return ALL_COLUMNS
        columns = tuple(columns)
        unknown = [c for c in columns if c not in ALL_COLUMNS]
        if unknown:
            raise ValueError(f"Unknown ShapesWorld column(s) {unknown}: choose from {ALL_COLUMNS}.")
        return columns

    def _rows(self, n: int, start: int, columns: Tuple[str, ...]):
        controls = any(c in CONTROL_COLUMNS or c == "classes" for c in columns)
        from PIL import Image

        for i in range(start, start + n):
            s = self.sample(i, with_controls=controls)
            row = {}
            for c in columns:
                if c == "classes":
                    row[c] = Image.fromarray(s["classes"], mode="L")
                else:
                    row[c] = s[c]
            yield row

    @staticmethod
    def _features(columns: Tuple[str, ...]):
        import datasets

        return datasets.Features(
            {c: datasets.Value("string") if c in ("text", "prompt") else datasets.Image() for c in columns}
        )

    def as_dataset(self, n: int, start: int = 0, columns: Optional[Sequence[str]] = None, streaming: bool = False):
        """
        Samples `start .. start + n - 1` as a `datasets` data set with MultiGen-20M / Captioned_ADE20K column names.

        Args:
            n: number of samples (> 0).
            start: index of the first sample (use disjoint ranges, or another seed, for held-out data).
            columns: a subset of `ALL_COLUMNS` (`image`, `text`, `prompt`, `hed`, `lineart`, `control_depth`,
                `control_seg`, `classes` (the raw class map as a mode-"L" image)); all by default.
            streaming: return an `IterableDataset` that draws the samples on the fly instead of an in-memory
                `Dataset`.
        """
        import datasets

        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}.")
        columns = self._check_columns(columns)
        features = self._features(columns)
        if streaming:

            def gen(start, n, columns):
                yield from self._rows(n, start, columns)

            return datasets.IterableDataset.from_generator(
                gen, features=features, gen_kwargs=dict(start=start, n=n, columns=columns)
            )
        data = {c: [] for c in columns}
        for row in self._rows(n, start, columns):
            for c in columns:
                data[c].append(row[c])
        return datasets.Dataset.from_dict(data, features=features)

    def save_imagefolder(self, path: str, n: int, start: int = 0, columns: Optional[Sequence[str]] = None) -> str:
        """
        Write samples `start .. start + n - 1` as PNGs plus `metadata.jsonl` (a `--train_data_dir` folder).

        The images go to `path/images/`, each control to `path/<column>/`; each metadata row holds `file_name` (the
        image), `text`, `prompt` and `<column>_file_name` for each control, relative to `path` (e.g.
        `"hed_file_name": "hed/000007.png"`): diffusers' ControlNet layout, which `datasets`' `imagefolder` builder
        loads as the image columns `image`, `hed`, ... (the project's `--train_data_dir` reads it that way).
        """
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}.")
        columns = self._check_columns(columns)
        image_columns = [c for c in columns if c not in ("text", "prompt")]
        for c in image_columns:
            os.makedirs(os.path.join(path, "images" if c == "image" else c), exist_ok=True)
        width = max(6, len(str(start + n - 1)))
        with open(os.path.join(path, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for i, row in enumerate(self._rows(n, start, columns)):
                name = f"{start + i:0{width}d}.png"
                meta = {}
                for c in columns:
                    if c in ("text", "prompt"):
                        meta[c] = row[c]
                        continue
                    rel = f"{'images' if c == 'image' else c}/{name}"
                    row[c].save(os.path.join(path, rel))
                    meta["file_name" if c == "image" else f"{c}_file_name"] = rel
                f.write(json.dumps(meta) + "\n")
        return path


# ------------------------------------------------------------------------------------------------ evaluation
class ShapesWorldEvalSet:
    """
    Held-out ShapesWorld scenes as `evaluation.EvalSample`s with exact controls: `eval_set[i]` is scene `start + i`.

    What `evaluation.generate_images` and `evaluation.compute_metrics` read (caption, image and control as
    `(3, H, W)` tensors in `[0, 1]`, and the class map for segmentation). Scenes are rendered on first use.

    Args:
        task: `hed`, `lineart`, `depth` or `segmentation` (which control column is the `control`).
        resolution, world_seed: the world (`ShapesWorld(resolution, world_seed)`).
        start, n: the scenes `start .. start + n - 1`.
    """

    def __init__(self, task: str, resolution: int = 64, world_seed: int = 0, start: int = 0, n: int = 256):
        from ..tasks import get_task

        if n <= 0 or start < 0:
            raise ValueError(f"Need n > 0 scenes from start >= 0, got n={n}, start={start}.")
        self.task = get_task(task) if isinstance(task, str) else task
        self.start, self.n = int(start), int(n)
        self.world = ShapesWorld(size=resolution, seed=world_seed)
        self._cache = {}

    @property
    def fingerprint(self):
        """What names the scene at each position (`evaluation.check_images_record`): eval set `i` is scene `start + i`."""
        return {"world": "ShapesWorld", "task": self.task.name, "resolution": self.world.size, "world_seed": self.world.seed,
                "start": self.start}

    def __len__(self):
        return self.n

    def __getitem__(self, index: int):
        import torch

        from ..evaluation import EvalSample

        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes.")
        if index not in self._cache:
            s = self.world.sample(self.start + index)

            def tensor(im):
                return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)

            classes = None
            if self.task.is_segmentation:
                classes = torch.from_numpy(np.asarray(s["classes"]).astype(np.int64))
            self._cache[index] = EvalSample(index=index, caption=s["text"], image=tensor(s["image"]),
                                            control=tensor(s[self.task.conditioning_column]), control_classes=classes)
        return self._cache[index]


# ------------------------------------------------------------------------------------------------ tokenizer
def _learn_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
    """
    Byte-pair-encoding merges that spell each of `words` into one token `word</w>` (plain BPE training).

    Written here rather than taken from `tokenizers`' `BpeTrainer` because that trainer breaks ties between
    equally frequent pairs in a run-dependent order, and the ids of a pretrained text encoder must not depend
    on the run: here the most frequent pair wins and ties go to the alphabetically first pair.
    """
    spelled = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts: Dict[Tuple[str, str], int] = {}
        for sym in spelled:
            for pair in zip(sym[:-1], sym[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, sym in enumerate(spelled):
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            spelled[k] = out


def write_word_tokenizer(path: str, words: Sequence[str] = VOCABULARY) -> str:
    """
    Write a CLIP tokenizer (vocab.json + merges.txt) in which each of `words` is one whole-word token `word</w>`.

    The vocabulary is numbered as CLIP's: `<|startoftext|>`, `<|endoftext|>`, the 256 byte-level characters,
    the same with `</w>` (so any other lowercase text still tokenises, character by character), then one
    token per merge, in merge order; the merges (`_learn_merges`) make each word a single token. The files
    are the same on every run. Load it with `CLIPTokenizer.from_pretrained(path, model_max_length=77)`.
    """
    from .tiny import byte_level_alphabet

    words = [w.lower() for w in words]
    bad = [w for w in words if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"Words must be plain lowercase ASCII letters; got {bad}.")
    merges = _learn_merges(words)
    chars = byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab: Dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:  # the header line of a GPT-2 merges file
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return path
