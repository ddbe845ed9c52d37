"""kaleido_s2v.vision wrappers against direct transformers calls, on tiny random-weight real-class folders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kaleido_s2v.errors import UserInputError
from kaleido_s2v.vision import CLIP, DINO, SAM, GroundingDINO
from kaleido_s2v.vision.common import center_crop, resize_short_side
from kaleido_s2v.vision.grounding import grounding_text
from kaleido_s2v.vision.tiny import save_tiny_clip, save_tiny_dino, save_tiny_grounding_dino, save_tiny_sam


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino"),
            "grounding_dino": save_tiny_grounding_dino(root / "gd"), "sam": save_tiny_sam(root / "sam")}


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (4, 48, 80, 3), dtype=np.uint8)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="role 'clip'"):
        CLIP(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="config.json"):
        DINO(tmp_path / "empty")


def test_resize_and_crop_match_torchvision_rules():
    x = torch.arange(2 * 3 * 48 * 80, dtype=torch.float32).reshape(2, 3, 48, 80)
    y = resize_short_side(x, 32, "bicubic")
    assert y.shape[-2:] == (32, int(32 * 80 / 48))  # long side truncated, as torchvision's Resize(int)
    ref = F.interpolate(x, size=(32, 53), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(y, ref)
    c = center_crop(y, 32)
    torch.testing.assert_close(c, y[..., :, 10:42])  # round((53 - 32) / 2) = 10
    assert resize_short_side(x[..., :32, :32], 32, "bilinear").data_ptr() == x[..., :32, :32].data_ptr()


def test_clip_matches_transformers(folders, frames):
    from transformers import AutoProcessor, CLIPModel

    clip = CLIP(folders["clip"])
    model, proc = CLIPModel.from_pretrained(folders["clip"]).eval(), AutoProcessor.from_pretrained(folders["clip"])
    from PIL import Image

    pils = [Image.fromarray(f) for f in frames]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=proc(images=pils, return_tensors="pt")["pixel_values"])
        ref = F.normalize(getattr(ref, "pooler_output", ref), dim=-1)
        tok = proc.tokenizer(["a cat", "a dog sits"], padding=True, return_tensors="pt")
        tref = model.get_text_features(**tok)
        tref = F.normalize(getattr(tref, "pooler_output", tref), dim=-1)
    torch.testing.assert_close(clip.embed_images(frames, batch_size=3), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clip.embed_texts(["a cat", "a dog sits"], batch_size=1), tref, atol=1e-5, rtol=1e-4)
    # VBench transform on an already model-sized square frame is just /255 and CLIP mean/std.
    sq = frames[:, :32, :32]
    px = clip.vbench_pixels(sq)
    manual = (torch.from_numpy(sq).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])
              .view(1, 3, 1, 1)) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(px, manual)
    v = clip.embed_images(frames, preprocess="vbench")
    assert v.shape == ref.shape and torch.allclose(v.norm(dim=-1), torch.ones(4))


def test_dino_cls_and_v1_interpolation(folders, frames):
    from transformers import ViTModel

    dino = DINO(folders["dino"])
    plain = ViTModel.from_pretrained(folders["dino"], add_pooling_layer=False).eval()
    sq = frames[:, :32, :32]  # model size: no interpolation, must equal the plain model's CLS token
    with torch.no_grad():
        ref = plain(pixel_values=dino.pixels(sq)).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.embed_frames(sq), F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4)
    # Non-square: DINO v1 interpolation by scale_factor (gh+0.1)/n, independently recomputed here.
    emb = dino.model.embeddings
    pos = emb.interpolate_pos_encoding(torch.zeros(1, 1, 32), 32, 53)
    n, gh, gw = 4, 4, 6
    patch = emb.position_embeddings[:, 1:].reshape(1, n, n, 32).permute(0, 3, 1, 2)
    want = F.interpolate(patch, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, -1, 32))
    out = dino.embed_frames(frames, batch_size=3)
    assert out.shape == (4, 32) and torch.isfinite(out).all()


def test_grounding_matches_post_processing(folders, frames):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    assert grounding_text(["A Dog", "cat."]) == "a dog. cat."
    gd = GroundingDINO(folders["grounding_dino"])
    dets = gd.detect(frames, "dog", box_threshold=0.0, text_threshold=0.0, batch_size=3)
    assert [len(d) for d in dets] == [20] * 4  # every query passes a zero threshold
    assert all(d[i].score >= d[i + 1].score for d in dets for i in range(len(d) - 1))
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folders["grounding_dino"]).eval()
    proc = AutoProcessor.from_pretrained(folders["grounding_dino"])
    from PIL import Image

    im = Image.fromarray(frames[1])
    inputs = proc(images=im, text="dog.", return_tensors="pt")
    with torch.no_grad():
        res = proc.post_process_grounded_object_detection(model(**inputs), inputs["input_ids"], threshold=0.0,
                                                          text_threshold=0.0, target_sizes=[(48, 80)])[0]
    best = int(res["scores"].argmax())
    assert dets[1][0].score == pytest.approx(float(res["scores"][best]), abs=1e-5)
    box = [min(max(v, 0), lim) for v, lim in zip(res["boxes"][best].tolist(), (80, 48, 80, 48))]
    assert dets[1][0].box == pytest.approx(tuple(box), abs=1e-3)
    assert gd.detect(frames, ["dog"], box_threshold=1.01) == [[], [], [], []]


def test_sam_masks_match_full_forward(folders, frames):
    from transformers import SamModel, SamProcessor

    sam = SAM(folders["sam"])
    boxes = [[(5, 5, 40, 30)], [], [(0, 0, 79, 47), (20, 10, 60, 40)], [(10, 10, 20, 20)]]
    out = sam.segment(frames, boxes, batch_size=3)
    assert [m.shape for m, _ in out] == [(1, 48, 80), (0, 48, 80), (2, 48, 80), (1, 48, 80)]
    model, proc = SamModel.from_pretrained(folders["sam"]).eval(), SamProcessor.from_pretrained(folders["sam"])
    from PIL import Image

    inputs = proc(images=Image.fromarray(frames[2]), input_boxes=[[list(map(float, b)) for b in boxes[2]]],
                  return_tensors="pt")
    with torch.no_grad():
        o = model(**inputs, multimask_output=False)
    logits = proc.image_processor.post_process_masks(o.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                                     binarize=False)[0][:, 0].numpy()
    # masks are logits > 0; another model instance may sum in another order, so pixels within fp32 noise of the
    # threshold may flip. Tolerance 1e-4 of the largest |logit| (the tiny model's logits are ~1e-6; measured noise
    # <= 1e-5 of that across ISAs); such pixels are < 1 %, every other pixel must agree.
    sure = np.abs(logits) > 1e-4 * np.abs(logits).max()
    assert sure.mean() > 0.99
    np.testing.assert_array_equal(out[2][0][sure], logits[sure] > 0)
    np.testing.assert_allclose(out[2][1], o.iou_scores[0, :, 0].numpy(), atol=1e-5)


def test_sam2_folder_without_torchvision_is_a_user_error(tmp_path):
    import importlib.util
    import json

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision installed: SAM 2 loads")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(UserInputError, match="torchvision"):
        SAM(tmp_path)


def test_resolve_dtype_names_and_auto():
    import torch

    from kaleido_s2v.vision.common import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("auto", cuda) is torch.bfloat16
    assert resolve_dtype("bf16", cpu) is resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("fp16", cpu) is torch.float16 and resolve_dtype("float32", cuda) is torch.float32
