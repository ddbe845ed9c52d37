import numpy as np
import pytest

from kaleido_s2v.curation.config import build_stage
from kaleido_s2v.curation.stages.face import FaceStage
from kaleido_s2v.curation.stages.filter import box_iou, consolidate, mask_iou, maximal_cliques, size_reason

from .footage import case_video


def test_box_and_mask_iou_on_hand_made_shapes():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[:4, :4] = True  # 16 px
    b[2:6, 2:6] = True  # 16 px, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(a, np.zeros_like(a)) == 0.0


def test_size_rule():
    assert size_reason([0, 0, 10, 10], 100, 100, 0.02, 0.9, 4) == "too_small"  # 1 % of the frame
    assert size_reason([0, 0, 50, 50], 100, 100, 0.02, 0.9, 4) is None
    assert size_reason([0, 0, 100, 95], 100, 100, 0.02, 0.9, 4) == "too_large"
    assert size_reason([0, 0, 90, 3], 100, 100, 0.02, 0.9, 4) == "too_small"  # thin sliver: side < 4 px


def test_maximal_cliques_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 7
        a = np.triu(rng.random((n, n)) < 0.5, 1)
        a = a | a.T
        adj = {u: {v for v in range(n) if a[u, v]} for u in range(n)}
        ours = {frozenset(c) for c in maximal_cliques(adj)}
        # brute force: all cliques that no other vertex extends
        brute = set()
        for mask in range(1, 1 << n):
            s = [i for i in range(n) if mask >> i & 1]
            if all(a[i, j] for i in s for j in s if i < j) and not any(
                    all(a[v, i] for i in s) for v in range(n) if v not in s):
                brute.add(frozenset(s))
        assert ours == brute


def test_clique_consolidation_finds_identities_across_frames():
    # 3 frames; two dogs (A: nodes 0,2,4; B: nodes 1,3) + one spurious box (5) similar to nothing
    frames = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    sim = np.full((6, 6), 0.1)
    for group in ([0, 2, 4], [1, 3]):
        for i in group:
            for j in group:
                sim[i, j] = 0.95
    sim[0, 1] = sim[1, 0] = 0.99  # same frame: never joined, however similar
    assert consolidate(list(range(6)), frames, sim, threshold=0.8, min_size=2) == [[0, 2, 4], [1, 3]]
    assert consolidate(list(range(6)), frames, sim, threshold=0.8, min_size=3) == [[0, 2, 4]]
    assert consolidate(list(range(6)), frames, sim, threshold=0.99, min_size=2) == []


def test_filter_config_errors(tmp_path):
    from kaleido_s2v.errors import UserInputError

    with pytest.raises(UserInputError, match="filter.*model"):
        build_stage("filter", {})
    with pytest.raises(UserInputError, match="does not exist"):
        build_stage("filter", {"model": str(tmp_path / "nope")})


def test_face_check_on_real_face_and_blank(examples_dir):
    from kaleido_s2v.video_io import read_video

    stage = FaceStage()
    frame = read_video(case_video(examples_dir, "case6"), max_frames=1)[0]  # a woman facing the camera
    person = frame[:, 160:480]
    res = stage.check_image(person)
    assert res["frontal"] and res["reason"] is None
    x0, y0, x1, y1 = res["box"]
    assert 60 < x0 + 160 < 300 and 30 < y0 < 120 and 40 < x1 - x0 < 200  # the face, near the top of the person
    assert stage.check_image(np.full((256, 256, 3), 200, np.uint8)) == {
        "frontal": False, "box": None, "profiles": 0, "reason": "no_face"}
    assert not stage.check_image(np.ascontiguousarray(np.rot90(person)))["frontal"]  # a face on its side
