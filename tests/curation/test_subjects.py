import json

import pytest

from kaleido_s2v.curation.config import build_stage
from kaleido_s2v.curation.tasks import Clip
from kaleido_s2v.curation.taxonomy import Taxonomy, load_taxonomy, plural
from kaleido_s2v.errors import UserInputError


def test_shipped_taxonomy_size_and_consistency():
    tax = load_taxonomy()
    assert len(tax.categories) >= 100 and tax.num_synonyms >= 800
    groups = {c["group"] for c in tax.categories.values()}
    assert {"person", "garment", "animal", "vehicle", "food", "furniture", "instrument", "tool", "toy",
            "building", "scene"} <= groups
    for name, cat in tax.categories.items():
        assert cat["synonyms"][0] == name and all(s == s.lower().strip() for s in cat["synonyms"])
    # every synonym maps back to exactly its own category
    for name, cat in tax.categories.items():
        for s in cat["synonyms"]:
            assert tax.form_to_category[s] == name


def test_plurals():
    irr = {"man": "men", "child": "children"}
    assert [plural(w, irr) for w in ["dog", "box", "puppy", "boy", "old man", "child", "dress"]] == [
        "dogs", "boxes", "puppies", "boys", "old men", "children", "dresses"]


def test_matching_is_word_bounded_plural_aware_longest_first():
    tax = load_taxonomy()
    found = [(m.category, m.phrase) for m in tax.find("Two Puppies chase a teddy bear past an old man in a T-shirt; "
                                                         "the catalogue and scattered cats stay.")]
    assert found == [("dog", "Puppies"), ("bear", "teddy bear"), ("man", "old man"), ("shirt", "T-shirt"),
                     ("cat", "cats")]  # no 'cat' inside 'catalogue' or 'scattered'
    assert [m.category for m in tax.find("Three women and two children walk.")] == ["woman", "child"]


def test_stage_candidates_record_and_rejects():
    stage = build_stage("subjects", {"max_subjects": 2})
    clip = Clip("c", "v.mp4", 0, 1)
    clip.fields["caption"] = "A woman in a red dress walks her dog on a beach; the dog barks at a woman."
    stage.process(clip)
    assert clip.kept and set(clip.fields) == {"caption", *stage.outputs()}
    assert clip.fields["subjects"] == [
        {"category": "woman", "group": "person", "phrase": "woman", "human": True, "mentions": 2},
        {"category": "dress", "group": "garment", "phrase": "dress", "human": False, "mentions": 1},
    ]  # 'beach' is a scene group (excluded by default), 'dog' cut by max_subjects
    empty = Clip("e", "v.mp4", 0, 1)
    empty.fields["caption"] = "Abstract colours swirl slowly."
    assert stage.process(empty).reasons == ["no_subjects"]
    assert stage.process(Clip("n", "v.mp4", 0, 1)).reasons == ["no_caption"]


def test_custom_taxonomy_file_and_bad_one(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"categories": {"widget": {"group": "object", "synonyms": ["widget", "gizmo"]}}}))
    assert [m.category for m in Taxonomy(json.loads(good.read_text())).find("two gizmos")] == ["widget"]
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UserInputError, match="not valid JSON"):
        build_stage("subjects", {"taxonomy": str(bad)})
