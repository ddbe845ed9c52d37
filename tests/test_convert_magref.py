"""Converter: the MAGREF release (a Wan2.1 image-to-video checkpoint) -> a `MagrefPipeline` folder, strict and safe.

The release is written in its official file layout from tiny components of the real classes (`magref_release.py`,
by the inverse of the converter's mappings); converted modules must equal the originals key by key and in a
forward pass, and the converted CLIP must compute what Wan's own visual tower computes (written out below).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kaleido_s2v.checkpoints import keymap
from kaleido_s2v.checkpoints.clip import TARGET_PREFIX, clip_hf_to_wan, clip_num_layers, clip_wan_to_hf_table
from kaleido_s2v.checkpoints.layout import CLIP_FILE, WAN_INDEX
from kaleido_s2v.cli import main
from kaleido_s2v.errors import UserInputError
from tests.magref_release import CLIP_WIDTH, write_magref_release

SHARD1 = "diffusion_pytorch_model-00001-of-00003.safetensors"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release") / "MAGREF"
    return root, write_magref_release(root)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    from kaleido_s2v.checkpoints import convert

    dst = tmp_path_factory.mktemp("converted") / "magref-diffusers"
    summary = convert(release[0], dst, max_shard_size="200KB", progress=False)
    return dst, summary


def assert_same_state(converted_model, original, as_float=False):
    got, want = converted_model.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k].float() if as_float else got[k]
        # exact: conversion copies the stored bytes (the source modules hold exactly the stored, rounded values)
        assert g.dtype == v.dtype and torch.equal(g, v), k


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------------------ key tables
I2V_14B = dict(image_dim=1280, added_kv_proj_dim=5120, in_channels=36)  # diffusers' "Wan-I2V-14B-480p"
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
                patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024)
# Wan2.1 `wan/modules/clip.py` VisionTransformer(pool_type='token', pre_norm=True), one block, read by hand
WAN_VISUAL_ONE_BLOCK = {
    "visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding", "visual.pre_norm.weight",
    "visual.pre_norm.bias", "visual.post_norm.weight", "visual.post_norm.bias",
    *(f"visual.transformer.0.{m}.{p}" for m in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2")
      for p in ("weight", "bias")),
}  # fmt: skip


def test_i2v_and_clip_tables_cover_the_release_architectures():
    from diffusers import WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):  # the 14B / ViT-H release architectures: free on the meta device
        dit = WanTransformer3DModel(**I2V_14B)
        vit = CLIPVisionModel(CLIPVisionConfig(**VIT_H_14))
    table = keymap.source_to_diffusers_table("wan_i2v", 40)
    targets = [d for dsts in table.values() for d in dsts]
    assert len(targets) == len(set(targets)) and set(targets) == set(dit.state_dict())  # each target once, all
    assert len(table) == 15 + 8 + (27 + 5) * 40  # T2V keys + img_emb.proj.{0,1,3,4} + k_img/v_img/norm_k_img
    assert {src for src, _, _ in keymap.diffusers_to_source_table("magref", 40).values()} == set(table)
    assert keymap.count_layers(table, "magref") == 40

    clip_table = clip_wan_to_hf_table(32)
    clip_targets = [d for dsts in clip_table.values() for d in dsts]
    want = {k if k.startswith(TARGET_PREFIX) else TARGET_PREFIX + k for k in vit.state_dict()}
    assert len(clip_targets) == len(set(clip_targets)) and set(clip_targets) == want
    assert set(clip_wan_to_hf_table(1)) == WAN_VISUAL_ONE_BLOCK and clip_num_layers(clip_table) == 32

    from kaleido_s2v.tiny import tiny_image_encoder, tiny_wan_i2v_transformer

    sd = tiny_wan_i2v_transformer(seed=1).state_dict()
    back = keymap.source_to_diffusers(keymap.diffusers_to_wan_i2v(sd), "wan_i2v")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # exact: renaming only
    wan = keymap.diffusers_to_wan_i2v(sd)
    assert torch.equal(wan["blocks.1.cross_attn.k_img.weight"], sd["blocks.1.attn2.add_k_proj.weight"])  # exact
    assert torch.equal(wan["img_emb.proj.3.weight"], sd["condition_embedder.image_embedder.ff.net.2.weight"])
    csd = tiny_image_encoder(seed=1).state_dict()
    wclip = clip_hf_to_wan(csd)
    qkv = torch.cat([csd[f"encoder.layers.2.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(wclip["visual.transformer.2.attn.to_qkv.weight"], qkv)  # exact: rows q | k | v
    assert wclip["visual.cls_embedding"].shape == (1, 1, 24) and wclip["visual.pos_embedding"].shape == (1, 5, 24)


# ------------------------------------------------------------------------------------------------ conversion
def wan_visual_block_31(sd: dict[str, torch.Tensor], pixels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Wan2.1's `VisionTransformer.forward(x, use_31_block=True)` on its own state dict (fp32): patches, class
    token, positions, pre-norm, then every block but the last: x += attn(norm1(x)) with the fused q|k|v split per
    head; x += fc2(GELU(fc1(norm2(x)))). LayerNorm eps 1e-5, exact GELU."""
    sd = {k: v.float() for k, v in sd.items()}
    w = sd["visual.patch_embedding.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    b, width = x.shape[0], x.shape[-1]
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]

    def norm(x, name):
        return F.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    x = norm(x, "visual.pre_norm")
    layers = clip_num_layers(sd)
    for i in range(layers - 1):
        p = f"visual.transformer.{i}"
        h = F.linear(norm(x, f"{p}.norm1"), sd[f"{p}.attn.to_qkv.weight"], sd[f"{p}.attn.to_qkv.bias"])
        q, k, v = h.view(b, -1, 3, num_heads, width // num_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(a.transpose(1, 2).reshape(b, -1, width), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = F.gelu(F.linear(norm(x, f"{p}.norm2"), sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"]))
        x = x + F.linear(h, sd[f"{p}.mlp.2.weight"], sd[f"{p}.mlp.2.bias"])
    return x


def test_magref_release_converts_and_loads(release, converted):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from kaleido_s2v.magref.pipeline import MagrefPipeline
    from kaleido_s2v.magref.release import magref_scheduler

    root, src = release
    dst, summary = converted

    # transformer: diffusers' own class, config from the shapes (+ config.json's num_heads), fp32 kept
    tr = WanTransformer3DModel.from_pretrained(dst, subfolder="transformer").eval()
    assert type(tr) is WanTransformer3DModel
    c = tr.config
    assert (c.in_channels, c.image_dim, c.added_kv_proj_dim, c.num_attention_heads, c.attention_head_dim) == (
        36, CLIP_WIDTH, 24, 2, 12)  # fmt: skip
    assert (c.num_layers, c.ffn_dim, c.text_dim, c.cross_attn_norm, c.qk_norm) == (2, 32, 32, True, "rms_norm_across_heads")
    assert_same_state(tr, src["transformer"])
    assert len(summary["components"]["transformer"]["shards"]) > 1
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 36, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    image = torch.randn(1, 5, CLIP_WIDTH, generator=g)
    with torch.no_grad():
        a = tr(x, torch.tensor([500.0]), text, encoder_hidden_states_image=image).sample
        b = src["transformer"](x, torch.tensor([500.0]), text, encoder_hidden_states_image=image).sample
    # weights bit-equal (above); two models at other addresses may still sum in another order: fp32, 2 blocks
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # image encoder: CLIPVisionModel, fp16 as stored, transformers' portable `vision_model.` names, 4 heads of 80
    stored = read_safetensors_folder(dst / "image_encoder")
    assert all(k.startswith("vision_model.") and v.dtype == torch.float16 for k, v in stored.items())
    clip = CLIPVisionModel.from_pretrained(dst / "image_encoder").eval()
    cc = clip.config
    assert (cc.hidden_size, cc.num_attention_heads, cc.num_hidden_layers, cc.intermediate_size) == (CLIP_WIDTH, 4, 3, 48)
    assert (cc.image_size, cc.patch_size, cc.hidden_act, cc.layer_norm_eps, cc.projection_dim) == (28, 14, "gelu", 1e-5, 16)
    clip = clip.float()
    assert_same_state(clip, src["image_encoder"])
    wan_sd = torch.load(root / CLIP_FILE, weights_only=True)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    with torch.no_grad():
        got = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    want = wan_visual_block_31(wan_sd, pixels, num_heads=4)
    # two fp32 computations of the same function: measured 0 here, but other kernels may sum in another order;
    # a wrong head count (8) moves it by >= 0.1, the last block instead of the second-to-last by 0.8
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert summary["components"]["image_encoder"]["skipped_prefixes"] == {"textual": 3, "log_scale": 1, "visual.head": 1}

    # VAE, umT5 (bf16 as stored), tokenizer
    assert_same_state(AutoencoderKLWan.from_pretrained(dst, subfolder="vae"), src["vae"])
    t5 = UMT5EncoderModel.from_pretrained(dst, subfolder="text_encoder")
    assert t5.config.relative_attention_max_distance == 128
    assert_same_state(t5, src["text_encoder"], as_float=True)
    tok = AutoTokenizer.from_pretrained(dst / "tokenizer")
    assert tok("a red ball").input_ids == src["tokenizer"]("a red ball").input_ids

    # model_index exactly as MagrefPipeline.save_pretrained writes it; the release's scheduler; no defaults file
    index = json.loads((dst / "model_index.json").read_text())
    MagrefPipeline(**src).save_pretrained(dst.parent / "saved")
    saved = json.loads((dst.parent / "saved" / "model_index.json").read_text())
    assert index == saved and index["_class_name"] == "MagrefPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert json.loads((dst / "scheduler/scheduler_config.json").read_text()) == json.loads(
        (dst.parent / "saved/scheduler/scheduler_config.json").read_text())  # fmt: skip
    assert dict(magref_scheduler().config)["flow_shift"] == 3.0
    assert not (dst / "generation_defaults.json").exists()
    assert summary["source_format"] == "magref" and summary["pipeline"] == "MagrefPipeline"
    assert [p.name for p in dst.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_magref_pipeline_loads_converted_folder(release, converted):
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPVisionModel

    from kaleido_s2v.magref.pipeline import MagrefPipeline

    pipe = MagrefPipeline.from_pretrained(converted[0])
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.image_encoder, CLIPVisionModel)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert_same_state(pipe.transformer, release[1]["transformer"])


def test_cli_converts_and_only_image_encoder(release, tmp_path, capsys):
    from transformers import CLIPVisionModel

    root, src = release
    assert main(["convert", "--src", str(root), "--dst", str(tmp_path / "all"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(magref)" in out and "MagrefPipeline" in out and "UniPCMultistepScheduler(flow_shift=3.0)" in out
    assert "skipped 5 unused keys" in out
    assert (tmp_path / "all/image_encoder/config.json").is_file()

    args = ["convert", "--src", str(root), "--dst", str(tmp_path / "clip"), "--only", "image_encoder"]
    assert main([*args, "--dtype", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["components"]) == {"image_encoder"}
    assert summary["components"]["image_encoder"]["dtype"] == ["float32"]
    index = json.loads((tmp_path / "clip/model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"] and index["transformer"] == [None, None]
    clip = CLIPVisionModel.from_pretrained(tmp_path / "clip/image_encoder")
    assert_same_state(clip, src["image_encoder"])  # fp32 from fp16: exact (every fp16 value is an fp32 value)

    # the head counts are options (not in the weights): a head dim that does not divide the width is refused
    assert main([*args[:4], str(tmp_path / "x"), "--only", "image_encoder", "--image-encoder-head-dim", "48"]) == 2
    assert "--image-encoder-head-dim 48: does not divide the CLIP width 320" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "y"), "--only", "image_encoder", "--image-encoder-head-dim", "40"]) == 0
    assert CLIPVisionModel.from_pretrained(tmp_path / "y/image_encoder").config.num_attention_heads == 8
    assert main([*args[:4], str(tmp_path / "z"), "--only", "transformer", "--attention-head-dim", "6"]) == 2
    err = capsys.readouterr().err
    assert "config.json: num_heads is 2 but the weights give 4 (--attention-head-dim sets the heads)" in err


# ------------------------------------------------------------------------------------------------ strictness
def _edit_shard(root: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(root / name))
    edit(sd)
    save_file(sd, str(root / name))
    index = json.loads((root / WAN_INDEX).read_text())
    weight_map = {k: v for k, v in index["weight_map"].items() if v != name}
    weight_map.update(dict.fromkeys(sd, name))
    (root / WAN_INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))


def _edit_index(root: Path, edit) -> None:
    index = json.loads((root / WAN_INDEX).read_text())
    edit(index["weight_map"])
    (root / WAN_INDEX).write_text(json.dumps(index))


def _edit_clip(root: Path, edit) -> None:
    sd = torch.load(root / CLIP_FILE, weights_only=True)
    edit(sd)
    torch.save(sd, root / CLIP_FILE)


def _edit_config(root: Path, **fields) -> None:
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, **fields}))


def _shard_of(root: Path, key: str) -> str:
    return json.loads((root / WAN_INDEX).read_text())["weight_map"][key]


CASES = {
    "dit_extra": (
        lambda r: _edit_shard(r, SHARD1, lambda sd: sd.update({"blocks.0.cross_attn.k_extra.weight": torch.zeros(2)})),
        "unexpected DiT keys blocks.0.cross_attn.k_extra.weight (not part of the Wan2.1 image-to-video DiT)",
    ),
    "dit_missing": (
        lambda r: _edit_shard(r, _shard_of(r, "blocks.1.cross_attn.norm_k_img.weight"),
                              lambda sd: sd.pop("blocks.1.cross_attn.norm_k_img.weight")),
        "missing DiT keys blocks.1.cross_attn.norm_k_img.weight",
    ),
    "dit_shape": (
        lambda r: _edit_shard(r, _shard_of(r, "blocks.1.cross_attn.v_img.weight"),
                              lambda sd: sd.update({"blocks.1.cross_attn.v_img.weight": torch.zeros(24, 12)})),
        "shape mismatch blocks.1.cross_attn.v_img.weight is (24, 12), expected (24, 24)",
    ),
    "dit_not_in_index": (
        lambda r: _edit_index(r, lambda weight_map: weight_map.pop("head.head.bias")),
        "key head.head.bias is not named by diffusion_pytorch_model.safetensors.index.json",
    ),
    "shard_missing": (
        lambda r: (r / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink(),
        "missing {root}/diffusion_pytorch_model-00002-of-00003.safetensors (named by "
        "diffusion_pytorch_model.safetensors.index.json)",
    ),
    "config_mismatch": (
        lambda r: _edit_config(r, num_layers=3),
        "{root}/config.json: num_layers is 3 but the weights give 2",
    ),
    "clip_extra": (
        lambda r: _edit_clip(r, lambda sd: sd.update({"visual.transformer.0.attn.extra": torch.zeros(2)})),
        "{root}/" + CLIP_FILE + ": unexpected CLIP keys visual.transformer.0.attn.extra",
    ),
    "clip_missing": (
        lambda r: _edit_clip(r, lambda sd: sd.pop("visual.transformer.2.mlp.2.bias")),
        "{root}/" + CLIP_FILE + ": missing CLIP keys visual.transformer.2.mlp.2.bias",
    ),
    "clip_shape": (
        lambda r: _edit_clip(r, lambda sd: sd.update({"visual.transformer.1.mlp.0.weight": torch.zeros(40, 320)})),
        "shape mismatch visual.transformer.1.mlp.0.weight is (40, 320), expected (48, 320)",
    ),
    "clip_cls_shape": (
        lambda r: _edit_clip(r, lambda sd: sd.update({"visual.cls_embedding": torch.zeros(320)})),
        "visual.cls_embedding has shape (320,), expected (1, 1, D)",
    ),
    "clip_file": (
        lambda r: (r / CLIP_FILE).unlink(),
        "missing {root}/" + CLIP_FILE + " (Wan's open-clip XLM-RoBERTa ViT-H/14)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_strict_release_exit_2_one_line_naming_the_key(release, tmp_path, capsys, case):
    root = tmp_path / "MAGREF"
    shutil.copytree(release[0], root)
    edit, expected = CASES[case]
    edit(root)
    dst = tmp_path / "out"
    assert main(["convert", "--src", str(root), "--dst", str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kaleido-s2v convert: error:") and err.strip().count("\n") == 0, err
    assert expected.format(root=root) in err, err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["MAGREF"]  # nothing half-written


def test_detection_keeps_wan_t2v_and_refuses_mismatched_formats(release, tmp_path, capsys):
    from kaleido_s2v.checkpoints.export import save_wan_release
    from kaleido_s2v.checkpoints.layout import detect_source, guess_format
    from kaleido_s2v.tiny import tiny_transformer

    assert guess_format(release[0]) == "magref"
    assert detect_source(release[0]).components[-1] == "image_encoder"
    t2v = save_wan_release(tmp_path / "Wan2.1-T2V", tiny_transformer().state_dict(), num_shards=2)
    assert guess_format(t2v) == "wan"
    (t2v / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v"}))
    assert guess_format(t2v) == "wan"
    with pytest.raises(UserInputError, match="choose a comma-separated subset of transformer,vae,text_encoder,tokenizer$"):
        detect_source(t2v, only="image_encoder")
    out = str(tmp_path / "out")
    assert main(["convert", "--src", str(t2v), "--dst", out, "--src-format", "magref", "--only", "transformer"]) == 2
    assert "model_type is 't2v', expected 'i2v'" in capsys.readouterr().err


def test_resolve_model_dir_auto_converts_a_magref_release(release, tmp_path, monkeypatch, capsys):
    from kaleido_s2v.checkpoints import resolve_model_dir

    monkeypatch.setenv("KALEIDO_S2V_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="kaleido-s2v convert --src"):
        resolve_model_dir(release[0])
    out = resolve_model_dir(release[0], auto_convert=True)
    assert out.parent == tmp_path / "cache" and out.name.startswith("MAGREF-")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "MagrefPipeline"
    assert "converting" in capsys.readouterr().err
    assert resolve_model_dir(release[0]) == out  # found in the cache afterwards

    from kaleido_s2v.magref.pipeline import MagrefPipeline

    pipe = MagrefPipeline.from_pretrained(release[0], auto_convert=True)  # the release folder itself: the cache
    assert pipe.image_encoder.config.hidden_size == CLIP_WIDTH and len(list((tmp_path / "cache").iterdir())) == 1
