"""Temporal smoothing of tracked keypoints: a constant-velocity Kalman filter and its RTS smoother.

Each keypoint's x and y follow a constant-velocity model over the frame
indices (a gap, e.g. an undecodable frame or ``--step``, is a longer time
step). A confident measurement enters with a variance that shrinks as its
confidence grows; a low-confidence point is not a measurement at all. The
Rauch-Tung-Striebel pass then runs backwards, so every estimate uses the
frames before and after it. Low-confidence points keep their measured
position in the output (they are marked, never replaced by the filter's
guess), so nothing is invented where the model saw nothing.

The noise levels are in units of the object's size (the tracker's box
side), so one setting serves small and large animals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SmoothingConfig:
    """``measurement``: standard deviation of a fully confident point, as a
    fraction of the object's size; ``acceleration``: standard deviation of
    the velocity's change per frame, same unit. A keypoint's series starts
    afresh (nothing carried across, either way) after ``max_gap`` frames
    without a measurement, or at a measurement more than ``gate`` standard
    deviations from the prediction (the animal came back elsewhere, or the
    tracker moved to it)."""

    measurement: float = 0.02
    acceleration: float = 0.01
    max_gap: int = 10
    gate: float = 5.0


def rts_smooth(times: np.ndarray, points: np.ndarray, confidence: np.ndarray, use: np.ndarray, size: float,
               config: SmoothingConfig = SmoothingConfig()) -> np.ndarray:
    """Smoothed positions [T, K, 2] of ``points`` [T, K, 2] at frame indices ``times`` [T] (increasing).

    ``confidence`` [T, K] in (0, 1] scales each measurement's variance
    (variance / confidence^2); only points with ``use`` [T, K] are
    measurements. Points not used, and keypoints never measured, come back
    as given (NaN stays NaN). ``size``: the object's size in pixels.
    """
    points = np.asarray(points, dtype=np.float64)
    t_count, k_count = points.shape[:2]
    out = points.copy()
    if t_count < 2:
        return out
    times = np.asarray(times, dtype=np.float64)
    use = np.asarray(use, dtype=bool) & np.isfinite(points).all(-1)
    conf = np.clip(np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=0.0), 1e-3, 1.0)
    r0 = (config.measurement * size) ** 2
    q = (config.acceleration * size) ** 2
    # state per keypoint and axis: (position, velocity); x and y are filtered alike and independently,
    # so the K x 2 series run together as one batch of N = 2K scalar filters
    z = points.transpose(1, 2, 0).reshape(-1, t_count)  # [N, T]
    meas = np.repeat(use.T, 2, axis=0)  # [N, T]
    var_r = np.repeat((r0 / conf ** 2).T, 2, axis=0)
    n = z.shape[0]
    mean_f = np.zeros((t_count, n, 2))
    cov_f = np.zeros((t_count, n, 2, 2))
    mean_p = np.zeros((t_count, n, 2))
    cov_p = np.zeros((t_count, n, 2, 2))
    started = np.zeros(n, dtype=bool)
    last_seen = np.full(n, -np.inf)
    cut = np.zeros((t_count, n), dtype=bool)  # series that start afresh at t: no smoothing across
    mean = np.zeros((n, 2))
    cov = np.zeros((n, 2, 2))
    for t in range(t_count):
        if t > 0:
            dt = times[t] - times[t - 1]
            f = np.array([[1.0, dt], [0.0, 1.0]])
            # white-noise acceleration over dt frames
            qm = q * np.array([[dt ** 3 / 3, dt ** 2 / 2], [dt ** 2 / 2, dt]])
            mean = mean @ f.T
            cov = f @ cov @ f.T + qm
        mean_p[t], cov_p[t] = mean, cov
        m = meas[:, t]
        s_pred = cov[:, 0, 0] + var_r[:, t]
        far = (z[:, t] - mean[:, 0]) ** 2 > config.gate ** 2 * s_pred
        restart = m & started & (far | (times[t] - last_seen > config.max_gap))
        restart = np.repeat(restart.reshape(-1, 2).any(1), 2)  # x and y of a keypoint together
        started &= ~restart
        cut[t] = restart
        first = m & ~started  # a series starts at its first measurement, at rest with a wide velocity
        mean[first] = np.stack([z[first, t], np.zeros(first.sum())], 1)
        cov[first] = 0.0
        cov[first, 0, 0] = var_r[first, t]
        cov[first, 1, 1] = (0.05 * size) ** 2
        update = m & started
        if update.any():
            s = cov[update, 0, 0] + var_r[update, t]
            gain = cov[update, :, 0] / s[:, None]  # [u, 2]
            resid = z[update, t] - mean[update, 0]
            mean[update] += gain * resid[:, None]
            cov[update] -= gain[:, :, None] * cov[update, 0, None, :]
        started |= m
        last_seen[m] = times[t]
        mean_f[t], cov_f[t] = mean, cov
    smooth = mean_f.copy()
    for t in range(t_count - 2, -1, -1):
        dt = times[t + 1] - times[t]
        f = np.array([[1.0, dt], [0.0, 1.0]])
        gain = cov_f[t] @ f.T @ np.linalg.inv(cov_p[t + 1] + 1e-12 * np.eye(2))
        gain[cut[t + 1]] = 0.0
        smooth[t] = mean_f[t] + (gain @ (smooth[t + 1] - mean_p[t + 1])[..., None])[..., 0]
    est = smooth[:, :, 0].T.reshape(k_count, 2, t_count).transpose(2, 0, 1)  # [T, K, 2]
    out[use] = est[use]  # only measured points are replaced by their smoothed estimate
    return out


def smooth_track(frames, reference: np.ndarray, config: SmoothingConfig = SmoothingConfig()) -> np.ndarray:
    """Smoothed keypoints [T, K, 2] of a list of escape_fast.track.TrackedFrame
    (frames that failed are NaN): confident points are smoothed with their
    relative score (score / ``reference`` [K]) as the confidence; the others
    keep their decoded position."""
    ok = [f for f in frames if f.ok]
    out = np.full((len(frames), len(reference), 2), np.nan)
    if not ok:
        return out
    times = np.array([f.index for f in ok], dtype=np.float64)
    points = np.stack([f.keypoints for f in ok])
    conf = np.stack([f.scores for f in ok]) / reference
    use = np.stack([f.confident for f in ok])
    size = float(np.median([max(f.box[2], f.box[3]) for f in ok]))
    smoothed = rts_smooth(times, points, conf, use, size, config)
    out[[i for i, f in enumerate(frames) if f.ok]] = smoothed
    return out
