"""Face identity: the ONNX ArcFace embedder format and the identity case on a real face photo."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kaleido_s2v.evaluation import METRICS, Case, Reference
from kaleido_s2v.evaluation.face import FaceDetector, FaceEmbedder
from kaleido_s2v.evaluation.frames import CaseData
from kaleido_s2v.evaluation.models import ModelStore
from kaleido_s2v.evaluation.tiny import save_tiny_models


def _tiny_arcface_onnx(folder):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=4, padding=3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 16)).eval()
    folder.mkdir()
    torch.onnx.export(net, (torch.randn(2, 3, 112, 112),), str(folder / "w600k_tiny.onnx"), input_names=["data"],
                      dynamic_axes={"data": {0: "n"}}, dynamo=False)
    return net


def test_onnx_arcface_embedder_matches_torch(tmp_path):
    import cv2

    net = _tiny_arcface_onnx(tmp_path / "face")
    emb = FaceEmbedder(tmp_path / "face")
    assert emb.kind == "onnx" and emb.size == (112, 112)
    crops = [np.random.default_rng(i).integers(0, 256, (60 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    x = np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_LINEAR) for c in crops]).astype(np.float32)
    x = torch.from_numpy(((x - 127.5) / 127.5).transpose(0, 3, 1, 2))
    with torch.no_grad():
        want = F.normalize(net(x), dim=-1)
    torch.testing.assert_close(emb.embed(crops), want, atol=1e-4, rtol=1e-4)


@pytest.mark.testdata
def test_video_of_the_reference_face_scores_one(tmp_path, examples_dir):
    ref = Image.open(examples_dir / "case1" / "image1.jpg").convert("RGB")
    ref.thumbnail((640, 640))
    a = np.asarray(ref)
    assert FaceDetector().largest_face(a) is not None
    paths = save_tiny_models(tmp_path, roles=("face",))
    data = CaseData(Case("c", None, "", (Reference(None, "man", "face"),)), np.repeat(a[None], 4, axis=0), [ref])
    res = METRICS["face_similarity"].load().score(data, ModelStore(paths), {"frames": 4})
    assert res.details["detection_rate"] == 1.0 and res.details["reference_index"] == 0
    assert res.value == pytest.approx(1.0, abs=1e-5)
