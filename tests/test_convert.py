"""Converter: official Kaleido (SAT) / Wan2.1 releases -> diffusers folder, strict and safe.

Fixtures are written in the releases' on-disk formats from tiny models of the real classes (`kaleido_s2v.tiny`)
by inverting the mapping (`checkpoints.export`); converted modules must equal the originals key by key and in
a forward pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from kaleido_s2v.checkpoints import keymap
from kaleido_s2v.checkpoints.export import save_official_release, save_wan_release
from kaleido_s2v.cli import main
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer

HEAD_DIM = 128  # the release's head dim, so the CLI default applies; width 128 = 1 head


def small_wan_vae(seed=0):
    """AutoencoderKLWan with Wan2.1's exact layout (dim_mult, res blocks) at width 4.

    `tiny_vae` has 1 residual block per level, a layout no Wan2.1 `.pth` has (and that diffusers' Wan VAE
    renaming does not cover), so the VAE fixture keeps the real layout and only shrinks the width.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=4, z_dim=16).eval()


def umt5_like_wan():
    """`tiny_text_encoder` with Wan's relative_attention_max_distance (128), which Wan's `.pth` does not store."""
    from transformers import UMT5EncoderModel

    tiny = tiny_text_encoder()
    config = tiny.config
    config.relative_attention_max_distance = 128
    model = UMT5EncoderModel(config).eval()
    model.load_state_dict(tiny.state_dict())
    return model


@pytest.fixture(scope="module")
def models():
    return dict(
        transformer=tiny_transformer(num_attention_heads=1, attention_head_dim=HEAD_DIM).eval(),
        text_encoder=umt5_like_wan(),
        vae=small_wan_vae(),
        tokenizer=tiny_tokenizer(),
    )


def bf16(sd):
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def write_release(root: Path, models, **kw) -> Path:
    kw.setdefault("extra_module_keys", {f"conditioner.embedders.0.model.w{i}": torch.zeros(3) for i in range(3)})
    return save_official_release(
        root,
        bf16(models["transformer"].state_dict()),
        models["vae"].state_dict(),
        bf16(models["text_encoder"].state_dict()),
        models["tokenizer"],
        iteration=kw.pop("iteration", "5"),
        args=argparse.Namespace(lr=5e-6, experiment_name="kaleido"),
        **kw,
    )


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_state(converted, original, dtype=None):
    got, want = converted.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        v = v.to(dtype) if dtype is not None else v
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k  # exact: the converter copies tensors (or casts them, as `dtype` here)


# ------------------------------------------------------------------------------------------------ key mapping
@pytest.mark.parametrize("fmt", ["official", "wan"])
def test_every_source_key_used_once_and_mapping_inverts(fmt):
    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    with torch.device("meta"):  # the 14B release architecture: free on the meta device
        big = KaleidoTransformer3DModel()
    table = keymap.source_to_diffusers_table(fmt, 40)
    targets = [d for dsts in table.values() for d in dsts]
    assert len(targets) == len(set(targets))  # no diffusers key produced twice
    assert set(targets) == set(big.state_dict())  # ... and together exactly the model's keys
    assert len(table) == (15 + 21 * 40 if fmt == "official" else 15 + 27 * 40)  # spec §5.2: 855 SAT tensors
    inverse = keymap.diffusers_to_source_table(fmt, 40)
    assert {src for src, _, _ in inverse.values()} == set(table)  # every source key used
    assert keymap.count_layers(table, fmt) == 40

    sd = tiny_transformer(seed=1).state_dict()
    src = keymap.diffusers_to_source(sd, fmt)
    back = keymap.source_to_diffusers(src, fmt)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # exact: key mapping, no arithmetic


def test_fused_projection_split_order_and_norm_swap():
    sd = tiny_transformer(seed=2).state_dict()
    sat = keymap.diffusers_to_sat(sd, prefix="")
    qkv = sat["transformer.layers.1.attention.query_key_value.weight"]
    q, k, v = (sd[f"blocks.1.attn1.to_{p}.weight"] for p in "qkv")
    # exact (all below): fusing and renaming only move tensors
    assert torch.equal(qkv, torch.cat([q, k, v]))  # rows [0:D] q, [D:2D] k, [2D:3D] v
    kv = sat["transformer.layers.0.cross_attention.key_value.bias"]
    assert torch.equal(kv, torch.cat([sd["blocks.0.attn2.to_k.bias"], sd["blocks.0.attn2.to_v.bias"]]))
    assert torch.equal(sat["transformer.layers.0.post_cross_attention_layernorm.weight"], sd["blocks.0.norm2.weight"])
    assert torch.equal(sat["mixins.final_layer.adaLN_modulation"], sd["scale_shift_table"])
    wan = keymap.diffusers_to_wan(sd)
    assert torch.equal(wan["blocks.0.norm3.weight"], sd["blocks.0.norm2.weight"])
    assert torch.equal(wan["head.modulation"], sd["scale_shift_table"])
    assert torch.equal(wan["blocks.1.modulation"], sd["blocks.1.scale_shift_table"])


def test_t5_mapping_covers_umt5_encoder():
    model = tiny_text_encoder()
    sd = model.state_dict()
    wan = keymap.t5_hf_to_wan(sd)
    table = keymap.t5_wan_to_hf_table(keymap.t5_num_layers(wan))
    assert set(table) == set(wan)
    assert set(table.values()) == set(sd) - {"encoder.embed_tokens.weight"}  # tied to shared.weight


# ------------------------------------------------------------------------------------------------ official
def test_official_release_converts_and_loads(tmp_path, models):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from kaleido_s2v.checkpoints import convert
    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    src = write_release(tmp_path / "Kaleido-14B-S2V", models)
    dst = tmp_path / "out"
    summary = convert(src, dst, max_shard_size="40KB", progress=False)

    # transformer: bf16 kept, config from shapes + the release's R-RoPE, equal key by key and in a forward pass
    stored = read_safetensors_folder(dst / "transformer")
    want = models["transformer"].state_dict()
    assert set(stored) == set(want)
    for k, v in want.items():
        assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], v.to(torch.bfloat16)), k  # exact: a copy
    tr_fp32 = KaleidoTransformer3DModel.from_pretrained(dst, subfolder="transformer").float()
    assert tr_fp32.config.num_layers == 2 and tr_fp32.config.attention_head_dim == HEAD_DIM
    assert tr_fp32.config.text_dim == 32 and tr_fp32.config.ffn_dim == 32
    assert (tr_fp32.config.ref_rope, tr_fp32.config.ref_rope_offset) == ("shift_hw", 80)
    ref = models["transformer"]
    ref_bf = type(ref)(**ref.config).eval()
    ref_bf.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    refs = torch.randn(1, 16, 2, 4, 4, generator=g)
    with torch.no_grad():
        a = tr_fp32(x, torch.tensor([500.0]), text, reference_latents=refs).sample
        b = ref_bf(x, torch.tensor([500.0]), text, reference_latents=refs).sample
    # The weights are equal bit for bit (above); this pass checks the config. Two models whose weights lie at other
    # addresses need not sum in the same order: fp32, 2 blocks, head dim 128, |x| <= 2 -> measured <= 3e-6 across
    # ATen/oneDNN ISAs. A wrong R-RoPE (offset 79, variant shift_h) moves it by >= 9e-3.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # VAE and umT5: equal key by key and in a forward pass
    vae = AutoencoderKLWan.from_pretrained(dst, subfolder="vae").eval()
    assert_same_state(vae, models["vae"])
    img = torch.rand(1, 3, 1, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        # fp32 conv stack, |z| <= 0.25: measured <= 9e-8 across ISAs (the weights themselves are checked exactly)
        torch.testing.assert_close(
            vae.encode(img).latent_dist.mode(), models["vae"].encode(img).latent_dist.mode(), rtol=1e-5, atol=1e-6
        )
    t5 = UMT5EncoderModel.from_pretrained(dst, subfolder="text_encoder").eval()
    assert_same_state(t5, models["text_encoder"], torch.bfloat16)
    assert t5.config.relative_attention_max_distance == 128
    tok = AutoTokenizer.from_pretrained(dst / "tokenizer")
    ids = tok(["a red ball", "two cats play"], padding=True, return_tensors="pt")
    ref_t5 = models["text_encoder"].to(torch.bfloat16)
    with torch.no_grad():
        # bf16: every op rounds to bf16 (eps 2^-7), so another fp32 summation order can land one bf16 step away and
        # grow through the layers: measured 2^-5 at |x| ~ 3 across ISAs; a wrong layer or head is O(1)
        torch.testing.assert_close(t5(**ids).last_hidden_state, ref_t5(**ids).last_hidden_state, rtol=2**-6, atol=2**-6)
    models["text_encoder"].float()

    # summary: counts, skipped T5 keys, sha256 per shard; model_index and scheduler as the pipeline expects
    saved = json.loads((dst / "conversion_summary.json").read_text())
    assert saved["components"]["transformer"]["tensors"] == len(models["transformer"].state_dict())
    assert saved["components"]["transformer"]["skipped_keys"] == 3
    assert saved["components"]["transformer"]["skipped_prefixes"] == {"conditioner": 3}
    assert saved["components"]["transformer"]["parameters"] == sum(
        p.numel() for p in models["transformer"].parameters()
    )
    assert saved["iteration"] == "5" and summary["components"].keys() == saved["components"].keys()
    shards = saved["components"]["transformer"]["shards"]
    assert len(shards) > 1 and (dst / "transformer/diffusion_pytorch_model.safetensors.index.json").is_file()
    for shard in shards:
        data = (dst / "transformer" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]  # exact: same bytes
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == "KaleidoPipeline"
    assert index["transformer"] == ["kaleido_s2v.transformer", "KaleidoTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert json.loads((dst / "scheduler/scheduler_config.json").read_text())["shift"] == 7.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_pipeline_from_pretrained_loads_converted_folder(tmp_path, models):
    from kaleido_s2v import pipeline
    src = write_release(tmp_path / "rel", models)
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--quiet"]) == 0
    pipe = pipeline.KaleidoPipeline.from_pretrained(tmp_path / "out")
    got = pipe.transformer.state_dict()
    for k, v in models["transformer"].state_dict().items():
        assert torch.equal(got[k].float(), v.to(torch.bfloat16).float()), k  # exact: dtype casts only
    assert_same_state(pipe.vae, models["vae"])
    assert pipe.scheduler.config.shift == 7.0 and type(pipe.tokenizer).__name__ == "ByT5Tokenizer"


def test_dtype_only_and_head_dim_options(tmp_path, capsys):
    model = tiny_transformer(seed=3)  # head dim 12: not the default, so --attention-head-dim is needed
    save_official_release(tmp_path / "rel", bf16(model.state_dict()))
    args = ["convert", "--src", str(tmp_path / "rel"), "--dst", str(tmp_path / "out"), "--only", "transformer"]
    assert main(args) == 2
    assert "--attention-head-dim 128: does not divide the model width 24" in capsys.readouterr().err
    assert main([*args, "--attention-head-dim", "12", "--dtype", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["components"]["transformer"]["dtype"] == ["float32"]
    assert set(summary["components"]) == {"transformer"}
    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    tr = KaleidoTransformer3DModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    assert tr.config.num_attention_heads == 2
    for k, v in model.state_dict().items():
        assert torch.equal(tr.state_dict()[k], v.to(torch.bfloat16).float()), k  # exact: dtype casts only
    index = json.loads((tmp_path / "out/model_index.json").read_text())
    assert index["vae"] == [None, None] and index["text_encoder"] == [None, None]


# ------------------------------------------------------------------------------------------------ Wan2.1 source
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_wan_release_converts(tmp_path, models, prefix):
    from kaleido_s2v.checkpoints import convert
    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    src = save_wan_release(
        tmp_path / "Wan2.1-T2V-14B",
        models["transformer"].state_dict(),
        vae_state_dict=models["vae"].state_dict(),
        num_shards=3,
        prefix=prefix,
    )
    summary = convert(src, tmp_path / "out", only="transformer,vae", progress=False)
    assert summary["source_format"] == "wan"
    assert_same_state(
        KaleidoTransformer3DModel.from_pretrained(tmp_path / "out", subfolder="transformer"), models["transformer"]
    )


def test_wan_i2v_keys_are_rejected(tmp_path, models, capsys):
    sd = models["transformer"].state_dict()
    root = save_wan_release(tmp_path / "Wan2.1-I2V-14B", sd, num_shards=1)
    from safetensors.torch import save_file

    save_file(
        {"blocks.0.cross_attn.k_img.weight": torch.zeros(128, 128)},
        str(root / "diffusion_pytorch_model-extra.safetensors"),
    )
    assert main(["convert", "--src", str(root), "--dst", str(tmp_path / "out"), "--only", "transformer"]) == 2
    assert "unexpected DiT keys blocks.0.cross_attn.k_img.weight" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ strictness
def _dit(models):
    return bf16(models["transformer"].state_dict())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "missing DiT keys model.diffusion_model.transformer.layers.1.mlp.dense_4h_to_h.bias"),
        ("unexpected", "unexpected DiT keys model.diffusion_model.mixins.adaln_layer.subject_adaLN_modulations.0"),
        ("shape", "shape mismatch model.diffusion_model.mixins.adaln_layer.adaLN_modulations.1 is (1, 5, 128)"),
    ],
)
def test_strict_dit_keys_exit_2_naming_the_key(tmp_path, models, capsys, case, expected):
    from kaleido_s2v.checkpoints.export import save_official_release as save

    sd = _dit(models)
    extra = {}
    if case == "missing":
        root = save(tmp_path / "rel", sd)
        path = root / "model/1/mp_rank_00_model_states.pt"
        ckpt = torch.load(path, weights_only=True)
        del ckpt["module"]["model.diffusion_model.transformer.layers.1.mlp.dense_4h_to_h.bias"]
        torch.save(ckpt, path)
    else:
        if case == "unexpected":
            extra = {"model.diffusion_model.mixins.adaln_layer.subject_adaLN_modulations.0": torch.zeros(1, 6, 128)}
        else:
            sd["blocks.1.scale_shift_table"] = torch.zeros(1, 5, 128)
        save(tmp_path / "rel", sd, extra_module_keys=extra)
    dst = tmp_path / "out"
    assert main(["convert", "--src", str(tmp_path / "rel"), "--dst", str(dst), "--only", "transformer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kaleido-s2v convert: error:") and expected in err, err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["rel"]  # nothing half-written


def test_missing_or_malformed_source_folder(tmp_path, capsys, models):
    out = str(tmp_path / "out")
    assert main(["convert", "--src", str(tmp_path / "nope"), "--dst", out]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--src", str(tmp_path / "empty"), "--dst", out]) == 2
    err = capsys.readouterr().err
    assert "model/latest" in err and "Wan2.1_VAE.pth" in err
    # transformer only present: the other components are named with their expected paths
    save_official_release(tmp_path / "rel", _dit(models))
    assert main(["convert", "--src", str(tmp_path / "rel"), "--dst", out]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/rel/Wan2.1_VAE.pth" in err and "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth" in err
    # the release's model/ folder instead of the release folder
    assert main(["convert", "--src", str(tmp_path / "rel/model"), "--dst", out]) == 2
    assert f"pass its parent {tmp_path / 'rel'}" in capsys.readouterr().err
    # latest names an iteration that is not there
    (tmp_path / "rel/model/latest").write_text("9\n")
    assert main(["convert", "--src", str(tmp_path / "rel"), "--dst", out, "--only", "transformer"]) == 2
    assert "model/9/mp_rank_00_model_states.pt" in capsys.readouterr().err
    # a corrupt checkpoint file
    (tmp_path / "rel/model/latest").write_text("1\n")
    (tmp_path / "rel/model/1/mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    assert main(["convert", "--src", str(tmp_path / "rel"), "--dst", out, "--only", "transformer"]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    assert not Path(out).exists()


def test_existing_unrelated_dst_is_refused(tmp_path, models, capsys):
    save_official_release(tmp_path / "rel", _dit(models))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    assert (
        main(["convert", "--src", str(tmp_path / "rel"), "--dst", str(tmp_path / "out"), "--only", "transformer"]) == 2
    )
    assert "already exists and was not made by kaleido-s2v convert" in capsys.readouterr().err
    assert (tmp_path / "out/notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_malicious_pickle_is_refused(tmp_path, models, capsys):
    root = save_official_release(tmp_path / "rel", _dit(models))
    path = root / "model/1/mp_rank_00_model_states.pt"
    ckpt = torch.load(path, weights_only=True)
    marker = tmp_path / "PWNED"
    ckpt["client_state"] = _Evil(marker)
    torch.save(ckpt, path)
    assert main(["convert", "--src", str(root), "--dst", str(tmp_path / "out"), "--only", "transformer"]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "system" in err and "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trust_pickle_loads_other_types(tmp_path, models, capsys):
    from kaleido_s2v.checkpoints import load_torch_file

    root = save_official_release(tmp_path / "rel", _dit(models))
    path = root / "model/1/mp_rank_00_model_states.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["save_dir"] = Path("/some/where")  # a harmless but non-allowlisted type
    torch.save(ckpt, path)
    with pytest.raises(UserInputError, match="refused to unpickle pathlib"):
        load_torch_file(path)
    args = ["convert", "--src", str(root), "--dst", str(tmp_path / "out"), "--only", "transformer"]
    with pytest.warns(UserWarning, match="full unpickling"):
        assert main([*args, "--trust-pickle", "--quiet"]) == 0
    with pytest.warns(UserWarning, match="full unpickling"):
        assert load_torch_file(path, trust_pickle=True)["save_dir"] == Path("/some/where")


def test_allowlisted_namespace_and_mmap(tmp_path):
    from kaleido_s2v.checkpoints import load_torch_file

    torch.save({"module": {"w": torch.arange(4.0)}, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "a.pt")
    obj = load_torch_file(tmp_path / "a.pt")
    assert obj["args"].lr == 1e-5 and torch.equal(obj["module"]["w"], torch.arange(4.0))  # exact: saved, loaded
    # memory-mapped: the tensor's data lies in a mapping of the file itself (nothing was copied)
    ptr = obj["module"]["w"].data_ptr()
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) >= 6 and m[5] == str(tmp_path / "a.pt")]
    assert any(lo <= ptr < hi for lo, hi in spans)


# ------------------------------------------------------------------------------------------------ shard writer
def test_shard_writer_round_trips_with_safetensors(tmp_path):
    from safetensors import safe_open

    from kaleido_s2v.checkpoints.shards import LazyTensor, parse_size, write_shards

    tensors = {
        "a": torch.randn(7, 5, dtype=torch.bfloat16),
        "b": torch.tensor(3.5),
        "c": torch.zeros(0, 4),
        "d": torch.randint(0, 9, (3, 2), dtype=torch.int64),
        "e": torch.randn(100, dtype=torch.float16),
        "f": torch.tensor([True, False]),
    }
    lazy = [LazyTensor(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    records = write_shards(lazy, tmp_path, "w", max_shard_bytes=parse_size("100B"))
    assert len(records) > 1
    index = json.loads((tmp_path / "w.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name  # exact: bytes written, read
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    with pytest.raises(UserInputError):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------ direct use
def test_resolve_model_dir(tmp_path, models, monkeypatch, capsys):
    from kaleido_s2v.checkpoints import resolve_model_dir

    src = write_release(tmp_path / "Kaleido-14B-S2V", models)
    monkeypatch.setenv("KALEIDO_S2V_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="kaleido-s2v convert --src") as info:
        resolve_model_dir(src)
    command = str(info.value).split("convert it once with: ")[1].split(" (or allow")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["kaleido-s2v", "convert"] and argv[5].startswith(str(tmp_path / "cache" / "Kaleido-14B-S2V-"))
    assert main([*argv[1:], "--quiet"]) == 0  # the printed command works as is
    assert resolve_model_dir(src) == Path(argv[5])  # ... and is then found in the cache

    other = tmp_path / "other-cache"
    out = resolve_model_dir(src, auto_convert=True, cache_dir=other)
    assert out.parent == other and (out / "model_index.json").is_file()
    assert "converting" in capsys.readouterr().err
    stamp = (out / "conversion_summary.json").stat().st_mtime_ns
    assert resolve_model_dir(src, auto_convert=True, cache_dir=other) == out
    assert (out / "conversion_summary.json").stat().st_mtime_ns == stamp  # reused, not converted again
    assert resolve_model_dir(out) == out  # a diffusers folder is returned as is

    (tmp_path / "random").mkdir()
    with pytest.raises(UserInputError, match="expected a diffusers pipeline folder"):
        resolve_model_dir(tmp_path / "random")
    with pytest.raises(UserInputError, match="no such folder"):
        resolve_model_dir(tmp_path / "missing")


def test_convert_help_is_fast_and_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--src", "--dst", "--only", "--max-shard-size", "--dtype", "--attention-head-dim", "--trust-pickle"):
        assert flag in out


def test_sentencepiece_tokenizer_folder(tmp_path):
    """umT5's tokenizer is sentencepiece: a folder with only `spiece.model` converts to an AutoTokenizer folder."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer, T5Tokenizer

    from kaleido_s2v.checkpoints import convert

    folder = tmp_path / "rel" / "umt5-xxl"
    folder.mkdir(parents=True)
    text = ["a red ball rolls on the floor", "two cats play with a toy", "the blue square bounces"] * 30
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(folder / "spiece"), vocab_size=28, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()
    convert(tmp_path / "rel", tmp_path / "out", only="tokenizer", progress=False)
    got = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    want = T5Tokenizer(vocab_file=str(folder / "spiece.model"))
    for prompt in ("a red ball", "two cats play on the floor"):
        assert got(prompt).input_ids == want(prompt).input_ids


def test_pipeline_generates_from_official_folder_like_the_original_models(tmp_path, models, monkeypatch):
    """`KaleidoPipeline.from_pretrained(<official folder>, auto_convert=True)` converts into the cache and then
    generates exactly what a pipeline assembled from the original (bf16-rounded) modules generates."""
    from PIL import Image

    from kaleido_s2v import pipeline
    from kaleido_s2v.tiny import tiny_scheduler

    monkeypatch.setenv("KALEIDO_S2V_CACHE", str(tmp_path / "cache"))
    src = write_release(tmp_path / "Kaleido-14B-S2V", models)
    converted = pipeline.KaleidoPipeline.from_pretrained(src, auto_convert=True, torch_dtype=torch.float32)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def rounded(model):  # the release stores the DiT and umT5 in bf16
        copy = type(model)(model.config) if hasattr(model, "main_input_name") else type(model)(**model.config)
        copy.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
        return copy.eval()

    original = pipeline.KaleidoPipeline(
        tokenizer=models["tokenizer"], text_encoder=rounded(models["text_encoder"]), vae=models["vae"],
        transformer=rounded(models["transformer"]), scheduler=tiny_scheduler(),
    )  # fmt: skip
    ref = Image.new("RGB", (24, 40), (200, 30, 30))
    kw = dict(prompt="a red cube", reference_images=[ref], height=32, width=32, num_frames=5, num_inference_steps=2)
    a = converted(**kw, generator=torch.Generator().manual_seed(0)).frames
    b = original(**kw, generator=torch.Generator().manual_seed(0)).frames
    # "exactly" up to float summation order: the two pipelines' (bit-equal) weights lie at other addresses, so
    # BLAS may sum differently. fp32 through 2 CFG steps (x6) and the VAE: measured <= 5e-5 in [0, 1] pixels
    # across ATen/oneDNN ISAs; a wrong R-RoPE offset (79) gives 7e-3, a wrong variant 3e-2.
    assert a.shape == b.shape and abs(a - b).max() <= 2e-4
