"""`subjects`: match the caption against the taxonomy to name candidate subjects (one per category).

Candidates keep the caption's own words (`phrase`, e.g. "puppies") for grounding and the category for the CLIP
check and statistics. A clip whose caption names no subject is rejected with `no_subjects`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import UserInputError
from ..stage import Stage
from ..tasks import Clip
from ..taxonomy import load_taxonomy


@dataclass
class SubjectsStage(Stage):
    name = "subjects"

    taxonomy: str = ""  # path to a taxonomy JSON; empty = the shipped one
    max_subjects: int = 3  # Kaleido's loader reads at most 3 references
    exclude_groups: list = field(default_factory=lambda: ["scene"])  # places are backgrounds, not references

    def inputs(self) -> list[str]:
        return ["caption"]

    def outputs(self) -> list[str]:
        return ["subjects"]

    def check(self) -> None:
        if self.max_subjects < 1:
            raise UserInputError(f"subjects.max_subjects must be >= 1, got {self.max_subjects}")
        load_taxonomy(self.taxonomy or None)

    def process(self, clip: Clip) -> Clip:
        caption = clip.fields.get("caption")
        if not isinstance(caption, str):
            clip.fields["subjects"] = []
            clip.reject("no_caption")
            return clip
        seen: dict[str, dict] = {}
        for m in load_taxonomy(self.taxonomy or None).find(caption):
            if m.group in self.exclude_groups:
                continue
            if m.category in seen:
                seen[m.category]["mentions"] += 1
                continue
            seen[m.category] = {"category": m.category, "group": m.group, "phrase": m.phrase.lower(),
                                "human": m.human, "mentions": 1}
        clip.fields["subjects"] = list(seen.values())[: self.max_subjects]
        if not seen:
            clip.reject("no_subjects")
        return clip
