"""The subject taxonomy (`kaleido_s2v/data/taxonomy.json`) and a caption matcher.

Matching is case-insensitive on word boundaries, plural-aware (regular plurals are generated for the last word
of every synonym, irregular ones come from the data file) and longest-first ("teddy bear" wins over "bear",
"old man" over "man"), as the reference notes recommend for Kaleido's category/synonym step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import UserInputError


def plural(word: str, irregular: dict[str, str]) -> str:
    head, _, last = word.rpartition(" ")
    if last in irregular:
        p = irregular[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


@dataclass(frozen=True)
class Match:
    category: str
    group: str
    phrase: str  # the words as they appear in the caption
    start: int
    human: bool


class Taxonomy:
    def __init__(self, data: dict):
        try:
            self.categories: dict[str, dict] = data["categories"]
            irregular = data.get("irregular_plurals", {})
            forms: dict[str, str] = {}
            syns = [(" ".join(s.lower().split()), name) for name, c in self.categories.items() for s in c["synonyms"]]
            for syn, name in syns:  # listed forms first: they win over generated plurals ("joggers")
                forms.setdefault(syn, name)
            for syn, name in syns:
                forms.setdefault(plural(syn, irregular), name)
        except (KeyError, TypeError, AttributeError) as e:
            raise UserInputError(f"taxonomy has a bad layout ({e}): expected {{'categories': {{name: "
                                 "{'group': .., 'synonyms': [..]}}}}") from e
        self.form_to_category = forms
        alternatives = sorted(forms, key=len, reverse=True)
        body = "|".join(r"\s+".join(map(re.escape, f.split())) for f in alternatives)
        self._re = re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)

    @property
    def num_synonyms(self) -> int:
        return sum(len(c["synonyms"]) for c in self.categories.values())

    def find(self, text: str) -> list[Match]:
        """Every taxonomy mention in `text`, in order (no overlaps; the longest form wins at each position)."""
        out = []
        for m in self._re.finditer(text):
            name = self.form_to_category[" ".join(m.group(0).lower().split())]
            cat = self.categories[name]
            out.append(Match(name, cat.get("group", ""), m.group(0), m.start(), bool(cat.get("human", False))))
        return out


@lru_cache(maxsize=4)
def load_taxonomy(path: str | None = None) -> Taxonomy:
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"taxonomy file '{p}' does not exist: check subjects.taxonomy")
        text = p.read_text(encoding="utf-8")
    else:
        text = resources.files("kaleido_s2v").joinpath("data/taxonomy.json").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"taxonomy '{path or 'taxonomy.json'}' is not valid JSON ({e})") from e
    return Taxonomy(data)
