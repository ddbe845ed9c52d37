"""VBench-style motion smoothness with a documented substitute for AMT-S frame interpolation.

VBench keeps the even frames, interpolates every odd frame from its two neighbours with AMT-S, and scores
(255 - d) / 255 with d the mean absolute error (0..255) of the interpolated odd frames. AMT-S is not in
transformers and its code is CC BY-NC, so this module interpolates with OpenCV optical flow (DIS by default,
or Farnebäck) warped bidirectionally to the midpoint, or with a plain linear blend: the same procedure and
normalisation, a weaker interpolator. The implementation used is
named in scores.json; scores are comparable across our runs, not to VBench's published numbers.
"""

from __future__ import annotations

import numpy as np

from .base import MetricResult

PARAMS = {
    "interpolator": "dis",  # dis | farneback (OpenCV optical flow, bidirectional midpoint warp) | linear
    "dis_preset": "fast",  # cv2.DISOPTICAL_FLOW_PRESET_{ULTRAFAST,FAST,MEDIUM}; full resolution
    "farneback": {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2},
    "flow_max_side": 448,  # farneback only: flow estimated at this longer side, then upsampled
    "frames": "all: even frames kept, each odd frame with two neighbours re-interpolated at t=1/2",
    "output_cast": "truncate to uint8 as VBench (x*255).clip(0,255).astype(uint8)",
}


def _warp(img: np.ndarray, flow: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, gx + scale * flow[..., 0], gy + scale * flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _flow(ga: np.ndarray, gb: np.ndarray, fb: dict, max_side: int | None) -> np.ndarray:
    import cv2

    h, w = ga.shape
    s = min(1.0, max_side / max(h, w)) if max_side else 1.0
    if s < 1.0:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        ga, gb = (cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in (ga, gb))
    args = (fb["pyr_scale"], fb["levels"], fb["winsize"], fb["iterations"], fb["poly_n"], fb["poly_sigma"], 0)
    flow = cv2.calcOpticalFlowFarneback(ga, gb, None, *args)
    if s < 1.0:
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR) / s
    return flow


def interpolate_midpoint(a: np.ndarray, b: np.ndarray, method: str = "dis", fb: dict | None = None,
                         flow_max_side: int | None = 448, dis_preset: str = "fast"):
    """The frame halfway between uint8 RGB frames a and b, as float32 0..255."""
    if method == "linear":
        return 0.5 * (a.astype(np.float32) + b.astype(np.float32))
    if method not in ("dis", "farneback"):
        raise ValueError(f"interpolator must be 'dis', 'farneback' or 'linear', got {method!r}")
    import cv2

    ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{dis_preset.upper()}"))
        f_ab, f_ba = dis.calc(ga, gb, None), dis.calc(gb, ga, None)  # a(x) ~ b(x + f_ab(x))
    else:
        fb = {**PARAMS["farneback"], **(fb or {})}
        f_ab, f_ba = _flow(ga, gb, fb, flow_max_side), _flow(gb, ga, fb, flow_max_side)
    # Backward warps to the midpoint, approximating the midpoint flow by the flow at the same pixel.
    from_a = _warp(a.astype(np.float32), f_ba, 0.5)
    from_b = _warp(b.astype(np.float32), f_ab, 0.5)
    return 0.5 * (from_a + from_b)


def motion_smoothness(frames: np.ndarray, method: str = "dis", fb: dict | None = None,
                      flow_max_side: int | None = 448, dis_preset: str = "fast") -> tuple[float, int]:
    """((255 - d) / 255, number of interpolated frames) for (T, H, W, 3) uint8 frames."""
    errs = []
    for i in range(1, len(frames) - 1, 2):
        pred = interpolate_midpoint(frames[i - 1], frames[i + 1], method, fb, flow_max_side, dis_preset)
        pred = np.clip(pred, 0, 255).astype(np.uint8)  # truncation, as VBench's astype(uint8)
        errs.append(np.abs(pred.astype(np.float32) - frames[i].astype(np.float32)).mean())
    if not errs:
        return float("nan"), 0
    return (255.0 - float(np.mean(errs))) / 255.0, len(errs)


def score(data, models, params) -> MetricResult:
    method = params.get("interpolator", "dis")
    if method != "linear":
        try:
            import cv2  # noqa: F401
        except ImportError:
            method = "linear"
    value, n = motion_smoothness(data.frames, method, params.get("farneback"), params.get("flow_max_side", 448),
                                 params.get("dis_preset", "fast"))
    impl = {"dis": "substitute for AMT-S: OpenCV DIS-flow midpoint interpolation",
            "farneback": "substitute for AMT-S: OpenCV Farneback-flow midpoint interpolation",
            "linear": "substitute for AMT-S: linear blend of neighbouring frames"}[method]
    if n == 0:
        return MetricResult(None, {"skipped": "video has fewer than 3 frames"}, impl)
    return MetricResult(value, {"interpolated_frames": n, "interpolator": method}, impl)
