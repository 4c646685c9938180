"""Built-in synthetic benchmark in MP-100's exact layout.

    python -m escape_fast.data.synthetic --out DIR [--size small|full] [--seed N]

(the command is escape_fast/data/synthetic/__main__.py; :func:`generate` the generator) writes ``DIR/annotations/mp100_split{1..5}_{train,val,test}.json``,
``DIR/images/<category>/<n>.{jpg,png}`` and ``DIR/synthetic_parts.json``, so
the benchmark goes through the same loader, crop, episodes and metric as
MP-100 itself.

The world
---------
* 8 families. A family is a procedurally drawn body plan: a spine of 3-5
  parts and 2-4 mirrored limbs of 1-3 joints, each part with a local
  appearance motif (shape x pattern x colour). The family's part types are
  the ground-truth super-keypoints; left and right joints of one limb share
  the motif (they are easy to confuse: only a small dot marks the left side,
  and a quarter of the instances are mirrored) but are distinct
  super-keypoints, since one category cannot give two keypoints to one
  super-keypoint.
* 100 categories (12 or 13 per family). A category keeps a subset of its
  family's parts (so K varies, 7 to 29), shifts the motifs' hue and size a
  little, and perturbs limb lengths and angles and the body's build.
* Instances add articulation (joint angles), a global rotation, scale,
  translation and mirror, their own body colour (a category is a body plan,
  not a colour: two dogs differ more than a dog's eye and a cat's eye), a
  hue and size jitter of all motifs, blobs half covering a third of its
  motifs (part-level nuisances), a cluttered background with random shapes and
  distractor motifs of the same family, occluders (keypoints under them are
  invisible, v = 0, as are keypoints outside the image), colour jitter,
  noise and blur.
* Files: JPEG for most categories, RGB PNG, grayscale JPEG and RGBA PNG for
  some, and a few JPEGs stored rotated with an EXIF orientation tag, so that
  every decoding path of the loader is exercised.
* Splits like MP-100: the categories are dealt family by family into five
  groups of 20; split s tests on group s, validates on 10 categories of
  group s + 1 and trains on the other 70. Test categories are disjoint across
  splits and every family appears in every split's train and test sets.

``synthetic_parts.json`` gives, for every category, the family, the part
type (motif) and the ground-truth super-keypoint (part type + side) of every
keypoint, to check learned super-keypoints against.

Deterministic: every image comes from ``default_rng([seed, category,
instance])``, families and categories from their own seeds, so the same
seed gives the same bytes (same numpy / OpenCV / Pillow builds) whatever the
number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["SIZES", "generate", "main"]

# Version 2: body colour per instance (was per category), smaller category
# shifts of the motifs and an instance-level motif jitter. Corresponding parts
# now vary less across categories than between two photos of one category,
# as in real data, which is what a prior from base categories can use.
# Version 3: a third of the motifs in each photo are half covered by a blob
# (NUISANCE), so that a single support can show a part atypically, as real
# photographs do; averaging over shots or over base categories removes it.
# Version 4: larger motifs (0.13 of the body unit, was 0.1) with steadier
# colours (photo hue cast N(0, 3), was N(0, 8); saturation and value drawn
# from narrower ranges), so that a part looks alike across the categories of
# its family, as an eye does across animals: cross-category nearest-neighbour
# purity of the learned keypoint features rose from 52% to 69%.
VERSION = 4
NUISANCE = 1 / 3
SIZES = {
    "small": {"image_size": 128, "instances": 30},
    "full": {"image_size": 256, "instances": 60},
}
NUM_FAMILIES = 8
NUM_CATEGORIES = 100
FAMILY_NAMES = ("quadra", "avian", "insecta", "manus", "facies", "pisces", "vehicula", "arbor")
SHAPES = ("disc", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring")
PATTERNS = ("solid", "core", "dot", "bar")
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------
# families and categories
# --------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    type_index: int  # index into the family's part types
    side: str  # "C", "L" or "R"
    parent: int  # index of the parent part in the body plan, -1 for the root
    limb: int  # limb number, -1 for the spine
    joint: int  # joint number along the limb (0 = attached to the spine)


@dataclass
class Family:
    index: int
    name: str
    spine: np.ndarray  # [n_spine, 2] canonical positions, head first
    limbs: list  # per limb: (spine index, angle deg (right side), [segment lengths], [bend deg])
    motifs: list  # per part type: (shape, pattern, hue, second hue)
    articulation: float  # std of joint angle noise (deg)
    width: float  # torso half-width
    parts: list  # all parts of the full plan


def _make_family(seed: int, f: int) -> Family:
    rng = np.random.default_rng([seed, 1, f])
    n_spine = int(rng.integers(3, 6))
    ys = np.linspace(-0.75, 0.75, n_spine) + rng.uniform(-0.08, 0.08, n_spine)
    spine = np.stack([np.zeros(n_spine), ys], axis=1)
    n_limbs = int(rng.integers(2, 5))
    attach = np.sort(rng.choice(n_spine, n_limbs, replace=n_limbs > n_spine))
    limbs = []
    for a in attach:
        angle = float(rng.uniform(-70, 70) + (0 if rng.random() < 0.5 else rng.choice([-1, 1]) * 40))
        n_seg = int(rng.integers(1, 4))
        lengths = rng.uniform(0.3, 0.55, n_seg).tolist()
        bends = rng.uniform(-45, 45, n_seg).tolist()
        bends[0] = 0.0
        limbs.append((int(a), angle, lengths, bends))
    parts = [Part(f"spine{i}", i, "C", i - 1, -1, i) for i in range(n_spine)]
    n_types = n_spine
    for li, (a, _, lengths, _) in enumerate(limbs):
        for j in range(len(lengths)):
            for side in ("L", "R"):
                parent = a if j == 0 else len(parts) - 2
                parts.append(Part(f"{side.lower()}_limb{li}_joint{j}", n_types, side, parent, li, j))
            n_types += 1
    combos = rng.permutation(len(SHAPES) * len(PATTERNS))[:n_types]
    hue0 = rng.uniform(0, 180)
    motifs = []
    for t, c in enumerate(combos):
        hue = float((hue0 + rng.uniform(-35, 35) + 60 * (t % 3)) % 180)
        motifs.append((SHAPES[c // len(PATTERNS)], PATTERNS[c % len(PATTERNS)], hue, float((hue + 90) % 180)))
    return Family(
        f, FAMILY_NAMES[f], spine, limbs, motifs, float(rng.uniform(6, 28)), float(rng.uniform(0.07, 0.18)), parts
    )


@dataclass
class CategorySpec:
    id: int
    name: str
    family: Family
    keep: list  # indices into family.parts, in keypoint order
    limb_scale: np.ndarray  # per limb
    limb_angle: np.ndarray  # per limb, degrees added
    spine_scale: float
    hue_shift: float
    motif_scale: float
    fmt: str  # "jpg", "png", "gray", "rgba"


def _make_category(seed: int, cid: int, family: Family, variant: int) -> CategorySpec:
    rng = np.random.default_rng([seed, 2, cid])
    n_spine = len(family.spine)
    n_limbs = len(family.limbs)
    # which parts exist: a spine of at least 2, at least one limb, limbs
    # possibly shortened; left and right always together (flip pairs)
    spine_keep = n_spine if rng.random() < 0.6 else max(2, n_spine - 1)
    limb_keep = rng.random(n_limbs) < 0.8
    if not limb_keep.any():
        limb_keep[rng.integers(n_limbs)] = True
    limb_len = [int(rng.integers(1, len(l[2]) + 1)) if rng.random() < 0.4 else len(l[2]) for l in family.limbs]
    def kept(spine_keep, limb_keep):
        out = []
        for i, p in enumerate(family.parts):
            if p.limb < 0:
                if p.joint < spine_keep:
                    out.append(i)
            elif limb_keep[p.limb] and p.joint < limb_len[p.limb] and family.limbs[p.limb][0] < spine_keep:
                out.append(i)
        return out

    keep = kept(spine_keep, limb_keep)
    if not any(family.parts[i].limb >= 0 for i in keep):  # every kept limb hung on a dropped tail
        keep = kept(n_spine, np.ones(n_limbs, dtype=bool))
    fmt_draw = rng.random()
    fmt = "jpg" if fmt_draw < 0.7 else "png" if fmt_draw < 0.85 else "gray" if fmt_draw < 0.95 else "rgba"
    return CategorySpec(
        id=cid,
        name=f"{family.name}_{variant:02d}",
        family=family,
        keep=keep,
        limb_scale=rng.uniform(0.75, 1.3, n_limbs),
        limb_angle=rng.normal(0, 15, n_limbs),
        spine_scale=float(rng.uniform(0.8, 1.2)),
        hue_shift=float(rng.uniform(-6, 6)),
        motif_scale=float(rng.uniform(0.9, 1.1)),
        fmt=fmt,
    )


def _world(seed: int):
    families = [_make_family(seed, f) for f in range(NUM_FAMILIES)]
    cats = []
    per = [NUM_CATEGORIES // NUM_FAMILIES + (f < NUM_CATEGORIES % NUM_FAMILIES) for f in range(NUM_FAMILIES)]
    cid = 1
    for f, n in enumerate(per):
        for v in range(n):
            cats.append(_make_category(seed, cid, families[f], v))
            cid += 1
    return families, cats


def _splits(cats) -> list[dict[str, list[int]]]:
    """Five MP-100-like splits: 70 train / 10 val / 20 test category ids."""
    groups = [[] for _ in range(5)]
    for i, c in enumerate(cats):  # cats are in family order: dealing spreads families
        groups[i % 5].append(c.id)
    out = []
    for s in range(5):
        test = sorted(groups[s])
        val = sorted(groups[(s + 1) % 5][:10])
        train = sorted(c.id for c in cats if c.id not in set(test) | set(val))
        out.append({"train": train, "val": val, "test": test})
    return out


# --------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------
def _hsv(h, s, v) -> tuple[int, int, int]:
    px = np.array([[[h % 180, np.clip(s, 0, 255), np.clip(v, 0, 255)]]], dtype=np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0])


def _fx(pts) -> np.ndarray:
    return np.round(np.asarray(pts, dtype=np.float64) * _ONE).astype(np.int32)


def _polygon(shape: str, center, r: float, angle: float) -> np.ndarray | None:
    n = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}.get(shape)
    if shape == "star":
        t = angle + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif shape == "cross":
        a, b = r, 0.38 * r
        base = np.array([[b, a], [b, b], [a, b], [a, -b], [b, -b], [b, -a], [-b, -a], [-b, -b], [-a, -b],
                         [-a, b], [-b, b], [-b, a]])
        c, s = math.cos(angle), math.sin(angle)
        return base @ np.array([[c, s], [-s, c]]) + center
    elif n is not None:
        off = np.pi / 4 if shape == "square" else 0.0
        t = angle + off + np.arange(n) * 2 * np.pi / n
        rad = np.full(n, r * (0.9 if shape == "square" else 1.05))
    else:
        return None
    return np.stack([center[0] + rad * np.cos(t), center[1] + rad * np.sin(t)], axis=1)


def _draw_shape(img, shape, center, r, angle, color, thickness=-1):
    poly = _polygon(shape, center, r, angle)
    if poly is None:  # disc or ring
        if shape == "ring":
            cv2.circle(img, tuple(_fx(center)), int(r * 0.8 * _ONE), color, max(1, int(r * 0.35)), cv2.LINE_AA, _SHIFT)
        else:
            cv2.circle(img, tuple(_fx(center)), int(r * _ONE), color, thickness, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(img, [_fx(poly)], color, cv2.LINE_AA, _SHIFT)


def _draw_motif(img, motif, center, r, angle, hue_shift, left_mark, rng):
    shape, pattern, hue, hue2 = motif
    sat = rng.uniform(200, 255)
    c1 = _hsv(hue + hue_shift + rng.normal(0, 2), sat, rng.uniform(190, 255))
    c2 = _hsv(hue2 + hue_shift, sat, rng.uniform(110, 200))
    _draw_shape(img, shape, center, r, angle, c1)
    if pattern == "core":
        _draw_shape(img, "disc" if shape == "ring" else shape, center, 0.45 * r, angle, c2)
    elif pattern == "dot":
        cv2.circle(img, tuple(_fx(center)), int(0.28 * r * _ONE), c2, -1, cv2.LINE_AA, _SHIFT)
    elif pattern == "bar":
        d = np.array([math.cos(angle), math.sin(angle)]) * 0.85 * r
        cv2.line(img, tuple(_fx(center - d)), tuple(_fx(center + d)), c2, max(1, int(0.3 * r)), cv2.LINE_AA, _SHIFT)
    if left_mark:  # the only local cue of the left side: a small pale dot
        d = np.array([math.cos(angle + 0.8), math.sin(angle + 0.8)]) * 0.75 * r
        cv2.circle(img, tuple(_fx(center + d)), int(max(1.0, 0.22 * r) * _ONE), (235, 235, 235), -1,
                   cv2.LINE_AA, _SHIFT)


def _pose(cat: CategorySpec, rng, normal=None) -> tuple[np.ndarray, np.ndarray]:
    """Positions [P, 2] and local angles [P] of the full plan, canonical frame.

    ``normal(0, std)`` draws each joint's angle noise (default
    ``rng.normal``; a video passes a smooth function of time instead)."""
    normal = rng.normal if normal is None else normal
    fam = cat.family
    n = len(fam.parts)
    pos = np.zeros((n, 2))
    ang = np.zeros(n)
    art = fam.articulation
    # spine: a chain from the head with small bends
    bend = 0.0
    for i in range(len(fam.spine)):
        if i == 0:
            pos[i] = fam.spine[0] * cat.spine_scale
        else:
            seg = (fam.spine[i] - fam.spine[i - 1]) * cat.spine_scale
            bend += math.radians(normal(0, art * 0.4))
            c, s = math.cos(bend), math.sin(bend)
            pos[i] = pos[i - 1] + np.array([c * seg[0] - s * seg[1], s * seg[0] + c * seg[1]])
        ang[i] = bend
    for li, (a, angle, lengths, bends) in enumerate(fam.limbs):
        base = ang[a]  # the limb turns with the spine where it is attached
        cb, sb = math.cos(base), math.sin(base)
        for side, sign in (("R", 1.0), ("L", -1.0)):
            direction = math.radians(angle + cat.limb_angle[li])
            prev = pos[a].copy()
            for j, (length, b) in enumerate(zip(lengths, bends)):
                direction += math.radians(b + normal(0, art))
                # the left limb mirrors the right one about the spine's axis
                dx, dy = sign * math.cos(direction), math.sin(direction)
                d = np.array([cb * dx - sb * dy, sb * dx + cb * dy])
                prev = prev + d * length * cat.limb_scale[li]
                idx = next(
                    k for k, p in enumerate(fam.parts) if p.limb == li and p.joint == j and p.side == side
                )
                pos[idx] = prev
                ang[idx] = math.atan2(d[1], d[0])
    return pos, ang


def _background(size: int, rng) -> np.ndarray:
    low = rng.uniform(30, 220, (4, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_object(img, cat: CategorySpec, pts, angles, unit: float, r: float, hue_shift: float, body, rng) -> None:
    """The object: limbs as thick strokes, the torso as a polygon along the
    spine, then every kept part's motif (``pts`` [P, 2] and ``angles`` [P]
    of the full plan in image pixels, ``unit`` the body's scale, ``r`` the
    motifs' radius)."""
    fam = cat.family
    thick = max(2, int(0.09 * unit))
    for i in cat.keep:
        p = fam.parts[i]
        if p.limb >= 0:
            parent = pts[p.parent] if p.joint > 0 else pts[fam.limbs[p.limb][0]]
            cv2.line(img, tuple(_fx(parent)), tuple(_fx(pts[i])), body, thick, cv2.LINE_AA, _SHIFT)
    spine_idx = [i for i in cat.keep if fam.parts[i].limb < 0]
    sp = pts[spine_idx]
    if len(sp) >= 2:
        d = np.gradient(sp, axis=0)
        nrm = np.stack([-d[:, 1], d[:, 0]], 1) / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        w = fam.width * unit
        torso = np.concatenate([sp + nrm * w, (sp - nrm * w)[::-1]])
        cv2.fillPoly(img, [_fx(torso)], body, cv2.LINE_AA, _SHIFT)
    for i in cat.keep:
        p = fam.parts[i]
        _draw_motif(img, fam.motifs[p.type_index], pts[i], r, angles[i], hue_shift, p.side == "L", rng)


def render_instance(cat: CategorySpec, instance: int, seed: int, size: int):
    """Draw one instance: (RGB uint8 [size, size, 3], keypoints [K, 3], bbox)."""
    fam = cat.family
    rng = np.random.default_rng([seed, 3, cat.id, instance])
    pos, ang = _pose(cat, rng)
    # global similarity transform (with a mirror a quarter of the time)
    unit = size * rng.uniform(0.22, 0.3)
    theta = math.radians(rng.uniform(-30, 30))
    mirror = -1.0 if rng.random() < 0.25 else 1.0
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]]) @ np.diag([mirror, 1.0]) * unit
    shift = np.array([size / 2, size / 2]) + rng.uniform(-0.12, 0.12, 2) * size
    pts = pos @ rot.T + shift
    u = np.stack([np.cos(ang), np.sin(ang)], 1) @ (rot / unit).T  # motif orientations
    angles = np.arctan2(u[:, 1], u[:, 0])

    img = _background(size, rng)
    # clutter: random strokes and blobs, then distractor motifs of the family
    for _ in range(int(rng.integers(3, 9))):
        col = tuple(int(v) for v in rng.uniform(0, 255, 3))
        p = rng.uniform(0, size, (2, 2))
        if rng.random() < 0.5:
            cv2.line(img, tuple(_fx(p[0])), tuple(_fx(p[1])), col, int(rng.integers(1, 4)), cv2.LINE_AA, _SHIFT)
        else:
            axes = tuple(int(v * _ONE) for v in rng.uniform(3, size / 6, 2))
            cv2.ellipse(img, tuple(_fx(p[0])), axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA,
                        _SHIFT)
    r = 0.13 * unit * cat.motif_scale * rng.uniform(0.85, 1.15)
    hue_shift = cat.hue_shift + rng.normal(0, 3)  # this photo's colour cast on the motifs
    kept_types = sorted({fam.parts[i].type_index for i in cat.keep})
    for _ in range(int(rng.integers(1, 4))):
        t = kept_types[int(rng.integers(len(kept_types)))]
        _draw_motif(img, fam.motifs[t], rng.uniform(0, size, 2), r * rng.uniform(0.8, 1.2),
                    rng.uniform(0, 2 * np.pi), hue_shift, rng.random() < 0.5, rng)

    # body: limbs as thick strokes, torso as a polygon along the spine
    body = _hsv(rng.uniform(0, 180), rng.uniform(20, 110), rng.uniform(70, 200))
    _draw_object(img, cat, pts, angles, unit, r, hue_shift, body, rng)
    # this photo's nuisances at single parts (a leaf, a glint, mud): a third of
    # the motifs is half covered by a blob of another colour; the keypoint
    # stays visible. One photo may show a part atypically; many do not.
    for i in cat.keep:
        if rng.random() < NUISANCE:
            t = rng.uniform(0, 2 * np.pi)
            centre = pts[i] + 0.55 * r * np.array([math.cos(t), math.sin(t)])
            col = tuple(int(v) for v in rng.uniform(0, 255, 3))
            cv2.circle(img, tuple(_fx(centre)), int(rng.uniform(0.6, 0.9) * r * _ONE), col, -1, cv2.LINE_AA, _SHIFT)

    # occluders hide keypoints (v = 0)
    occ = np.zeros((size, size), np.uint8)
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            centre = pts[cat.keep[int(rng.integers(len(cat.keep)))]] + rng.normal(0, 0.1 * unit, 2)
            n = int(rng.integers(4, 7))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.12, 0.25, n) * unit
            poly = _fx(np.stack([centre[0] + rad * np.cos(t), centre[1] + rad * np.sin(t)], 1))
            col = tuple(int(v) for v in rng.uniform(0, 255, 3))
            cv2.fillPoly(img, [poly], col, cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(occ, [poly], 1, cv2.LINE_8, _SHIFT)

    # appearance: colour jitter, noise, blur
    gain = rng.uniform(0.8, 1.2, 3)
    bias = rng.uniform(-20, 20, 3)
    out = img.astype(np.float32) * gain.astype(np.float32) + bias.astype(np.float32)
    out += rng.normal(0, rng.uniform(2, 9), out.shape).astype(np.float32)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    img = np.clip(np.round(out), 0, 255).astype(np.uint8)

    kps = np.zeros((len(cat.keep), 3))
    for k, i in enumerate(cat.keep):
        x, y = pts[i]
        xi, yi = int(round(x)), int(round(y))
        inside = 0 <= xi < size and 0 <= yi < size
        if inside and not occ[yi, xi]:
            kps[k] = (round(float(x), 2), round(float(y), 2), 2)
    # box of the whole object (occluded parts included, as annotators do)
    allp = pts[cat.keep]
    lo = np.clip(allp.min(0) - r, 0, size - 1)
    hi = np.clip(allp.max(0) + r, 0, size - 1)
    bbox = [round(float(lo[0]), 2), round(float(lo[1]), 2), round(float(hi[0] - lo[0]), 2),
            round(float(hi[1] - lo[1]), 2)]
    return img, kps, bbox


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------
def _encode(img: np.ndarray, fmt: str, exif_rotate: bool) -> tuple[bytes, str]:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue(), "png"
    if fmt == "rgba":
        alpha = np.full(img.shape[:2] + (1,), 255, np.uint8)
        Image.fromarray(np.concatenate([img, alpha], 2), "RGBA").save(buf, format="PNG")
        return buf.getvalue(), "png"
    pil = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if fmt == "gray" else img)
    if exif_rotate:
        # store the pixels turned 90 degrees counter-clockwise with EXIF
        # orientation 6 ("rotate 90 CW to display"): a reader that ignores
        # EXIF gets a turned image and wrong keypoints
        pil = pil.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        pil.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    else:
        pil.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), "jpg"


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_category(args):
    cat, seed, size, instances, out = args
    images, anns = [], []
    folder = Path(out) / "images" / cat.name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(instances):
        img, kps, bbox = render_instance(cat, i, seed, size)
        exif_rotate = cat.fmt in ("jpg", "gray") and np.random.default_rng([seed, 4, cat.id, i]).random() < 0.03
        data, ext = _encode(img, cat.fmt, exif_rotate)
        name = f"{cat.name}/{i:04d}.{ext}"
        (Path(out) / "images" / name).write_bytes(data)
        uid = (cat.id - 1) * 10000 + i + 1
        images.append({"id": uid, "file_name": name, "width": size, "height": size})
        anns.append({
            "id": uid,
            "image_id": uid,
            "category_id": cat.id,
            "bbox": bbox,
            "area": round(bbox[2] * bbox[3], 2),
            "iscrowd": 0,
            "keypoints": [v for row in kps.tolist() for v in (row[0], row[1], int(row[2]))],
            "num_keypoints": int((kps[:, 2] > 0).sum()),
        })
    return cat.id, images, anns


def _category_json(cat: CategorySpec) -> dict:
    fam = cat.family
    parts = [fam.parts[i] for i in cat.keep]
    where = {pi: k for k, pi in enumerate(cat.keep)}
    skeleton = []
    for k, i in enumerate(cat.keep):
        p = fam.parts[i]
        parent = p.parent if p.limb < 0 or p.joint > 0 else fam.limbs[p.limb][0]
        if parent >= 0 and parent in where:
            skeleton.append([where[parent] + 1, k + 1])  # COCO: 1-based
    flips = []
    for k, p in enumerate(parts):
        if p.side == "L":
            mate = next(m for m, q in enumerate(parts) if q.limb == p.limb and q.joint == p.joint and q.side == "R")
            flips.append([k, mate])
    return {
        "id": cat.id,
        "name": cat.name,
        "supercategory": fam.name,
        "keypoints": [p.name for p in parts],
        "skeleton": skeleton,
        "flip_pairs": flips,
    }


def generate(
    out, size: str = "small", seed: int = 0, workers: int = 1, progress: bool = True, instances: int | None = None
) -> dict:
    """Write the benchmark to ``out``; returns {"annotations": [paths],
    "parts": path}. ``instances`` overrides the number of instances per
    category of ``size`` (quick runs and tests; the protocol needs at least
    S + Q = 16 or 20). See the module docstring."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    from tqdm import tqdm

    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    conf = dict(SIZES[size])
    if instances is not None:
        if instances < 1 or instances > 9999:
            raise ValueError(f"instances must be in 1..9999, got {instances}")
        conf["instances"] = int(instances)
    families, cats = _world(seed)
    jobs = [(c, seed, conf["image_size"], conf["instances"], str(out)) for c in cats]
    bar = tqdm(total=len(jobs), desc=f"synthetic {size} (seed {seed})", unit="category", disable=not progress)
    results = {}
    if workers > 1:
        import multiprocessing

        cv2.setNumThreads(0)  # OpenCV's thread pool does not survive fork()
        # Pool's exit terminates the workers at once when the main process stops (Ctrl-C,
        # SIGTERM through escape_fast.cli); the workers leave SIGINT to the main process.
        with multiprocessing.Pool(workers, initializer=_ignore_sigint) as pool:
            for cid, images, anns in pool.imap(_render_category, jobs):
                results[cid] = (images, anns)
                bar.update()
    else:
        for job in jobs:
            cid, images, anns = _render_category(job)
            results[cid] = (images, anns)
            bar.update()
    bar.close()

    by_id = {c.id: c for c in cats}
    paths = []
    info = {"description": f"escape_fast synthetic benchmark ({size}, seed {seed})", "version": str(VERSION)}
    for s, split in enumerate(_splits(cats), start=1):
        for mode in ("train", "val", "test"):
            ids = split[mode]
            doc = {
                "info": info,
                "images": [im for c in ids for im in results[c][0]],
                "annotations": [a for c in ids for a in results[c][1]],
                "categories": [_category_json(by_id[c]) for c in ids],
            }
            path = out / "annotations" / f"mp100_split{s}_{mode}.json"
            path.write_text(json.dumps(doc, separators=(",", ":")))
            paths.append(path)

    type_ids = {}
    part_types = []
    for fam in families:
        for t, (shape, pattern, _, _) in enumerate(fam.motifs):
            type_ids[(fam.index, t)] = len(part_types)
            part_types.append({"id": len(part_types), "family": fam.name, "shape": shape, "pattern": pattern})
    sk_ids = {}
    meta_cats = []
    for c in cats:
        kp_types, kp_super, sides = [], [], []
        for i in c.keep:
            p = c.family.parts[i]
            kp_types.append(type_ids[(c.family.index, p.type_index)])
            sk_ids.setdefault((c.family.index, i), len(sk_ids))
            kp_super.append(sk_ids[(c.family.index, i)])
            sides.append(p.side)
        meta_cats.append({
            "id": c.id,
            "name": c.name,
            "family": c.family.name,
            "keypoint_part_type": kp_types,
            "keypoint_super_keypoint": kp_super,
            "keypoint_side": sides,
        })
    parts_path = out / "synthetic_parts.json"
    parts_path.write_text(json.dumps({
        "seed": seed,
        "size": size,
        "instances": conf["instances"],
        "part_types": part_types,
        "num_super_keypoints": len(sk_ids),
        "super_keypoint_doc": "one per (family, body-plan part): part type plus side; left and right differ",
        "categories": meta_cats,
        "splits": _splits(cats),
    }, separators=(",", ":")))
    return {"annotations": paths, "parts": parts_path}
