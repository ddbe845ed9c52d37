"""`export`: the training sets — `OUTPUT/train_manifest.jsonl` and Kaleido's folder layout under `OUTPUT/kaleido/`.

Per kept clip (`process`): the clip re-encoded at exactly 16 fps (`export/clips16/<clip_id>.mp4`; Kaleido's
loader takes consecutive native frames below 32 fps, so the rate must be fixed here) and its candidate samples,
one per reference type whose images exist for all kept subjects (at most `max_refs`, Kaleido reads ref1..ref3):

- `crop`: the subject's box cut from the frame (background kept)
- `segment`: the subject's mask on white
- `inpaint`: FLUX Fill backgrounds (`inpaint` stage), or cross-pair composites (`crosspair`) when there are none
- `redux`: FLUX Redux variants

After all clips (`finalize`): the mixing sampler draws samples per type in the ratio `mix` (crop : segment :
inpaint : redux = 1 : 5 : 3 : 1 by default), as many as the scarcest type allows (types with no candidates are
left out and the others renormalised; `max_samples` caps the total), with a seeded RNG. The chosen samples are
written as `kaleido/videos/<id>.mp4` (hard link to the 16 fps clip), `kaleido/labels/<id>.txt` (the caption, one
line) and `kaleido/references/<id>/ref{k}.png` (RGB, no alpha), and as lines of `train_manifest.jsonl` with
`clip_id, sample_id, type, video, caption, references, status` (paths relative to OUTPUT).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserInputError
from ...fileio import atomic_path, write_text_atomic
from ..stage import Stage
from ..tasks import Clip

TYPES = ("crop", "segment", "inpaint", "redux")


def mix_counts(available: dict[str, int], mix: dict[str, float], max_samples: int | None = None) -> dict[str, int]:
    """Samples per type: proportional to `mix` over the types that have candidates, as many as availability allows.

    Largest total N with floor-rounded shares; leftover slots go to the largest remainders that still have
    candidates. Deterministic.
    """
    types = [t for t in mix if mix[t] > 0 and available.get(t, 0) > 0]
    if not types:
        return {t: 0 for t in mix}
    w = sum(mix[t] for t in types)
    total = min(math.floor(available[t] * w / mix[t] + 1e-9) for t in types)
    total = min(total, sum(available[t] for t in types))
    if max_samples is not None:
        total = min(total, max_samples)
    exact = {t: total * mix[t] / w for t in types}
    counts = {t: min(available[t], math.floor(exact[t] + 1e-9)) for t in types}
    for t in sorted(types, key=lambda t: (-(exact[t] - math.floor(exact[t] + 1e-9)), types.index(t))):
        if sum(counts.values()) >= total:
            break
        if counts[t] < available[t]:
            counts[t] += 1
    return {t: counts.get(t, 0) for t in mix}


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class ExportStage(Stage):
    name = "export"
    needs_pool = True

    mix: dict = field(default_factory=lambda: {"crop": 1, "segment": 5, "inpaint": 3, "redux": 1})
    max_refs: int = 3
    max_samples: int = 0  # 0: no cap
    seed: int = 0
    fps: int = 16
    layout_dir: str = "kaleido"

    def inputs(self) -> list[str]:
        return ["caption", "subjects"]

    def outputs(self) -> list[str]:
        return ["export"]

    def check(self) -> None:
        bad = [k for k in self.mix if k not in TYPES]
        if bad or not all(isinstance(v, (int, float)) and v >= 0 for v in self.mix.values()) or not any(
                self.mix.values()):
            raise UserInputError(f"export.mix must map {', '.join(TYPES)} to non-negative weights (not all 0), "
                                 f"got {self.mix}")
        if not 1 <= self.max_refs <= 3:
            raise UserInputError(f"export.max_refs must be 1..3 (Kaleido reads ref1..ref3), got {self.max_refs}")

    @staticmethod
    def candidate_refs(subjects: list[dict], kind: str) -> list[str] | None:
        paths = []
        for s in subjects:
            if kind == "crop":
                p = (s.get("refs") or {}).get("crop")
            elif kind == "segment":
                p = (s.get("refs") or {}).get("segment")
            elif kind == "inpaint":
                p = (s.get("inpaint") or {}).get("path") or (s.get("crosspair") or {}).get("path")
            else:
                p = (s.get("redux") or {}).get("path")
            if not p:
                return None
            paths.append(p)
        return paths or None

    def process(self, clip: Clip) -> Clip:
        from ..frames import stream_clip

        caption = clip.fields.get("caption")
        kept = [s for s in clip.fields.get("subjects") or [] if s.get("status") == "kept"][: self.max_refs]
        if not caption or not kept:
            clip.fields["export"] = {"candidates": {}}
            clip.reject("no_caption" if not caption else "no_subjects")
            return clip
        rel = f"export/clips{self.fps}/{clip.clip_id}.mp4"
        dst = Path(self.output_dir) / rel
        if not dst.is_file():
            try:
                stream_clip(clip.source, clip.start_s, clip.end_s, dst, fps=self.fps)
            except (UserInputError, ValueError) as e:
                clip.fields["export"] = {"candidates": {}, "error": str(e)}
                clip.reject("unreadable")
                return clip
        candidates = {t: refs for t in TYPES if (refs := self.candidate_refs(kept, t))}
        clip.fields["export"] = {"video": rel, "candidates": candidates}
        if not candidates:
            clip.reject("no_references")
        return clip

    def finalize(self, clips: list[Clip]) -> dict[str, int]:
        out = Path(self.output_dir)
        pool: dict[str, list[Clip]] = {t: [] for t in TYPES}
        for c in clips:
            if c.kept and c.fields.get("export", {}).get("candidates"):
                for t in c.fields["export"]["candidates"]:
                    pool[t].append(c)
        counts = mix_counts({t: len(v) for t, v in pool.items()}, self.mix, self.max_samples or None)
        rng = random.Random(self.seed)
        chosen: list[tuple[str, Clip]] = []
        for t in TYPES:
            members = sorted(pool[t], key=lambda c: c.clip_id)
            chosen += [(t, c) for c in sorted(rng.sample(members, counts.get(t, 0)), key=lambda c: c.clip_id)]
        layout = out / self.layout_dir
        with atomic_path(layout, is_dir=True) as tmp:
            lines = []
            for t, c in chosen:
                sid = f"{c.clip_id}-{t}"
                link_or_copy(out / c.fields["export"]["video"], tmp / "videos" / f"{sid}.mp4")
                (tmp / "labels").mkdir(exist_ok=True)
                (tmp / "labels" / f"{sid}.txt").write_text(" ".join(c.fields["caption"].split()) + "\n")
                refs = []
                for k, p in enumerate(c.fields["export"]["candidates"][t], start=1):
                    from PIL import Image

                    d = tmp / "references" / sid
                    d.mkdir(parents=True, exist_ok=True)
                    Image.open(out / p).convert("RGB").save(d / f"ref{k}.png")
                    refs.append(f"{self.layout_dir}/references/{sid}/ref{k}.png")
                lines.append(json.dumps({
                    "clip_id": c.clip_id, "sample_id": sid, "type": t, "video": f"{self.layout_dir}/videos/{sid}.mp4",
                    "caption": " ".join(c.fields["caption"].split()), "references": refs, "status": "kept",
                    "source": c.source, "source_start_s": c.start_s, "source_end_s": c.end_s,
                }, sort_keys=True))
        write_text_atomic(out / "train_manifest.jsonl", "".join(line + "\n" for line in lines))
        self.last_counts = counts
        return counts
