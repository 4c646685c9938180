"""Synthetic videos with ground truth: an object of the built-in benchmark that moves.

:func:`render_video` draws one instance of a benchmark category (the
families, categories and motifs of escape_fast.data.synthetic) over a
still, cluttered arena, frame after frame: it moves along a smooth path,
turns, grows and shrinks a little and bends its joints smoothly; an
occluder passes over it once, and once it walks out of the view and comes
back. Each frame comes with its keypoints [K, 3] (v = 0 under the occluder
or outside the frame) and the object's box, so a tracker's output can be
scored frame by frame (benchmarks/bench_track.py).

Deterministic: everything comes from ``default_rng([seed, 11, category,
video])``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from escape_fast.data.synthetic import CategorySpec, _background, _draw_motif, _draw_object, _fx, _hsv, _pose, _world


@dataclass(frozen=True)
class VideoSpec:
    """What one synthetic video shows: ``frames`` frames of ``width`` x
    ``height``; the object leaves the view during ``away`` (first, last
    frame), the occluder crosses it during ``occluded``, and it stands
    still (only the camera noise changes) during ``still``."""

    category: int
    video: int
    frames: int
    width: int
    height: int
    away: tuple[int, int]
    occluded: tuple[int, int]
    still: tuple[int, int]


class _Smooth:
    """A smooth random signal per call number: the i-th call at time t gives
    std * sqrt(2) * sin(w_i t + phi_i) (the same standard deviation as the
    still benchmark's draws, slowly varying)."""

    def __init__(self, rng, t: float, period: tuple[float, float]):
        self.rng, self.t, self.period = rng, t, period
        self.calls = 0
        self.params: list[tuple[float, float]] = []

    def __call__(self, mean, std):
        if self.calls == len(self.params):
            self.params.append((2 * math.pi / self.rng.uniform(*self.period), self.rng.uniform(0, 2 * math.pi)))
        w, phi = self.params[self.calls]
        self.calls += 1
        return mean + std * math.sqrt(2) * math.sin(w * self.t + phi)


def category_of(category: int, seed: int = 0) -> CategorySpec:
    """The benchmark's category with this id (1 to 100)."""
    _, cats = _world(seed)
    for c in cats:
        if c.id == category:
            return c
    raise ValueError(f"no synthetic category {category} (ids 1 to {len(cats)})")


def video_spec(category: int, video: int, frames: int = 300, width: int = 640, height: int = 480,
               seed: int = 0) -> VideoSpec:
    rng = np.random.default_rng([seed, 12, category, video])
    away_start = int(frames * rng.uniform(0.55, 0.65))
    away = (away_start, away_start + max(2, frames // 15))
    occ_start = int(frames * rng.uniform(0.25, 0.35))
    occluded = (occ_start, occ_start + max(2, frames // 10))
    still_start = int(frames * rng.uniform(0.75, 0.8))
    still = (still_start, still_start + max(2, frames // 12))
    return VideoSpec(category, video, frames, width, height, away, occluded, still)


def render_video(spec: VideoSpec, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(RGB uint8 [H, W, 3], keypoints [K, 3], box [x, y, w, h])`` for each frame of ``spec``."""
    cat = category_of(spec.category, seed)
    fam = cat.family
    rng = np.random.default_rng([seed, 11, spec.category, spec.video])
    w, h = spec.width, spec.height
    side = min(w, h)
    # the arena: a still background with clutter and distractor motifs
    arena = cv2.resize(_background(64, rng), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(6, 14))):
        col = tuple(int(v) for v in rng.uniform(0, 255, 3))
        p = rng.uniform(0, 1, (2, 2)) * [w, h]
        axes = tuple(int(v * (1 << 4)) for v in rng.uniform(5, side / 8, 2))
        cv2.ellipse(arena, tuple(_fx(p[0])), axes, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA, 4)
    unit = side * rng.uniform(0.09, 0.12)  # the body's scale: an animal about a quarter of the frame long
    r = 0.13 * unit * cat.motif_scale
    hue_shift = cat.hue_shift + rng.normal(0, 3)
    kept_types = sorted({fam.parts[i].type_index for i in cat.keep})
    for _ in range(int(rng.integers(2, 5))):
        t = kept_types[int(rng.integers(len(kept_types)))]
        _draw_motif(arena, fam.motifs[t], rng.uniform(0, 1, 2) * [w, h], r * rng.uniform(0.8, 1.2),
                    rng.uniform(0, 2 * np.pi), hue_shift, rng.random() < 0.5, rng)
    body = _hsv(rng.uniform(0, 180), rng.uniform(20, 110), rng.uniform(70, 200))
    colour_seed = int(rng.integers(1 << 31))  # the motifs' colours: the same draws in every frame
    pose_seed = int(rng.integers(1 << 31))
    # the path: two slow sinusoids per axis around the middle, then out of the view and back
    amp = np.array([w, h]) * 0.28
    freq = rng.uniform(0.6, 1.6, (2, 2)) * 2 * math.pi / spec.frames
    phase = rng.uniform(0, 2 * math.pi, (2, 2))
    exit_dir = rng.choice([-1.0, 1.0])
    theta0, turn = rng.uniform(-math.pi, math.pi), rng.uniform(0.8, 2.0) * rng.choice([-1, 1])
    turn_freq = rng.uniform(0.5, 1.5) * 2 * math.pi / spec.frames
    occ_r = unit * 0.6
    occ_col = tuple(int(v) for v in rng.uniform(0, 255, 3))
    a0, a1 = spec.away
    o0, o1 = spec.occluded
    s0, s1 = spec.still
    for n in range(spec.frames):
        f = n if n < s0 else s0 if n <= s1 else n - (s1 - s0)  # the motion's clock stops while it stands still
        centre = np.array([w, h]) / 2 + amp * (np.sin(freq[:, 0] * f + phase[:, 0]) * 0.7
                                               + np.sin(freq[:, 1] * f + phase[:, 1]) * 0.3)
        # leaving: a smooth push out through the side wall and back, over the away window plus ramps
        ramp = max(1, (a1 - a0) // 2)
        if a0 - ramp <= f <= a1 + ramp:
            u = np.clip((f - (a0 - ramp)) / ramp, 0, 1) * np.clip(((a1 + ramp) - f) / ramp, 0, 1)
            centre = centre + np.array([exit_dir * u * (w * 0.5 + 4 * unit), 0.0])
        theta = theta0 + turn * math.sin(turn_freq * f)
        scale = unit * (1 + 0.12 * math.sin(2 * math.pi * f / spec.frames * 1.3))
        pos, ang = _pose(cat, None, _Smooth(np.random.default_rng(pose_seed), f, (spec.frames / 6, spec.frames / 2)))
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, -s], [s, c]]) * scale
        pts = pos @ rot.T + centre
        u = np.stack([np.cos(ang), np.sin(ang)], 1) @ (rot / scale).T
        angles = np.arctan2(u[:, 1], u[:, 0])
        img = arena.copy()
        _draw_object(img, cat, pts, angles, scale, r * scale / unit, hue_shift, body,
                     np.random.default_rng(colour_seed))
        occ = None
        if o0 <= f <= o1:  # a disc that slides across the object
            frac = (f - o0) / max(o1 - o0, 1)
            start = pts[cat.keep].mean(0)
            occ = start + np.array([(frac - 0.5) * 4 * unit, (frac - 0.5) * 1.5 * unit])
            cv2.circle(img, tuple(_fx(occ)), int(occ_r * (1 << 4)), occ_col, -1, cv2.LINE_AA, 4)
        frame_rng = np.random.default_rng([seed, 13, spec.category, spec.video, n])
        noisy = img.astype(np.float32) + frame_rng.normal(0, 3, img.shape).astype(np.float32)
        img = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        kps = np.zeros((len(cat.keep), 3))
        for k, i in enumerate(cat.keep):
            x, y = pts[i]
            hidden = occ is not None and math.hypot(x - occ[0], y - occ[1]) < occ_r
            if 0 <= x < w and 0 <= y < h and not hidden:
                kps[k] = (x, y, 2)
        allp = pts[cat.keep]
        lo, hi = allp.min(0) - r, allp.max(0) + r
        yield img, kps, np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])


def keypoint_names(category: int, seed: int = 0) -> list[str]:
    cat = category_of(category, seed)
    return [cat.family.parts[i].name for i in cat.keep]


def skeleton(category: int, seed: int = 0) -> list[list[int]]:
    """Limbs between kept parts and their kept parents (0-based keypoint indices)."""
    cat = category_of(category, seed)
    where = {i: k for k, i in enumerate(cat.keep)}
    limbs = []
    for k, i in enumerate(cat.keep):
        p = cat.family.parts[i]
        if p.parent in where:
            limbs.append([where[p.parent], k])
    return limbs
