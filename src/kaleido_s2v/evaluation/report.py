"""scores.json, scores.csv and a self-contained report.html (base64 thumbnails, inline SVG plots)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_path, write_text_atomic


def thumbnail_uri(img: Image.Image | np.ndarray, size: int = 128) -> str:
    """A JPEG `data:` URI of the image scaled to fit `size` x `size`."""
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    im = im.convert("RGB").copy()
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def bar_chart_svg(title: str, values: dict[str, float | None], width: int = 420) -> str:
    """A horizontal bar chart (one bar per case, missing values marked) as an inline <svg> element."""
    rows = list(values.items())
    bar_h, left, top = 16, 110, 24
    height = top + bar_h * len(rows) + 24
    finite = [v for _, v in rows if v is not None and math.isfinite(v)]
    lo = min(0.0, *finite) if finite else 0.0
    hi = max(1.0, *finite) if finite else 1.0
    span = (hi - lo) or 1.0
    plot_w = width - left - 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="4" y="15" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    x0 = left + plot_w * (0 - lo) / span
    for i, (name, v) in enumerate(rows):
        y = top + i * bar_h
        parts.append(f'<text x="{left - 4}" y="{y + 12}" font-size="11" text-anchor="end">'
                     f'{html.escape(str(name)[:16])}</text>')
        if v is None or not math.isfinite(v):
            parts.append(f'<text x="{x0 + 4:.1f}" y="{y + 12}" font-size="11" fill="#999">n/a</text>')
            continue
        x1 = left + plot_w * (v - lo) / span
        parts.append(f'<rect x="{min(x0, x1):.1f}" y="{y + 2}" width="{abs(x1 - x0):.1f}" height="{bar_h - 4}" '
                     f'fill="#4a7bd0"><title>{html.escape(str(name))}: {v:.4f}</title></rect>')
        parts.append(f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 12}" font-size="11">{v:.3f}</text>')
    axis_y = top + bar_h * len(rows) + 4
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
    parts.append(f'<text x="{left}" y="{axis_y + 14}" font-size="10">{lo:.3g}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{axis_y + 14}" font-size="10" text-anchor="end">{hi:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _finite(obj):
    """JSON has no NaN/inf: non-finite floats become null (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, scores: dict) -> None:
    write_text_atomic(path, json.dumps(_finite(scores), indent=2, allow_nan=False, default=str) + "\n")


def write_csv(path: Path, scores: dict) -> None:
    metrics = list(scores["mean"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_id", *metrics])
        for cid, row in scores["per_case"].items():
            w.writerow([cid, *("" if row.get(m) is None else f"{row[m]:.6f}" for m in metrics)])
        w.writerow(["mean", *("" if scores["mean"][m] is None else f"{scores['mean'][m]:.6f}" for m in metrics)])


def write_html(path: Path, scores: dict, thumbs: dict[str, dict]) -> None:
    """thumbs[case_id] = {"references": [data URI], "frames": [data URI], "prompt": str}."""
    metrics = list(scores["mean"])
    css = ("body{font-family:sans-serif;margin:20px;color:#222}table{border-collapse:collapse;margin:8px 0}"
           "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}"
           "th{background:#f0f0f0}img{margin:1px;border:1px solid #ddd}.plots svg{margin:6px 12px 6px 0}"
           ".prompt{max-width:420px;font-size:12px;color:#555}.num{text-align:right;font-family:monospace}"
           "pre{white-space:pre-wrap;font-size:12px}")
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>kaleido-s2v evaluation</title>",
           f"<style>{css}</style></head><body><h1>kaleido-s2v evaluation</h1>",
           f"<p>{len(scores['per_case'])} cases, metrics: {', '.join(metrics)}</p>",
           "<h2>Mean scores</h2><table><tr><th>metric</th><th>mean</th><th>implementation</th>"
           "<th>scored / skipped</th></tr>"]
    for m in metrics:
        info = scores["metrics"][m]
        out.append(f"<tr><td>{m}</td><td class='num'>{_fmt(scores['mean'][m])}</td>"
                   f"<td>{html.escape('; '.join(info['implementation']))}</td>"
                   f"<td>{info['n_scored']} / {info['n_skipped']}</td></tr>")
    out.append("</table><h2>Per metric</h2><div class='plots'>")
    for m in metrics:
        out.append(bar_chart_svg(m, {cid: row.get(m) for cid, row in scores["per_case"].items()}))
    out.append("</div><h2>Per case</h2><table><tr><th>case</th><th>references</th><th>frames</th><th>scores</th></tr>")
    for cid, row in scores["per_case"].items():
        t = thumbs.get(cid, {})
        refs = "".join(f"<img src='{u}' alt='reference {i}'>" for i, u in enumerate(t.get("references", [])))
        frames = "".join(f"<img src='{u}' alt='frame {i}'>" for i, u in enumerate(t.get("frames", [])))
        score_rows = "".join(f"<tr><td>{m}</td><td class='num'>{_fmt(row.get(m))}</td></tr>" for m in metrics)
        err = scores.get("errors", {}).get(cid)
        err_html = f"<p style='color:#b00'>{html.escape(err)}</p>" if err else ""
        out.append(f"<tr><td><b>{html.escape(cid)}</b><div class='prompt'>{html.escape(t.get('prompt', ''))}</div>"
                   f"{err_html}</td><td>{refs}</td><td>{frames}</td><td><table>{score_rows}</table></td></tr>")
    out.append("</table><h2>Parameters</h2><pre>")
    out.append(html.escape(json.dumps({m: scores["metrics"][m]["params"] for m in metrics}, indent=1, default=str)))
    out.append("</pre></body></html>\n")
    write_text_atomic(path, "".join(out))
