"""`--lora FILE[:SCALE]`: LoRA files in diffusers, original Wan and kohya names, checked against a hand merge."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from kaleido_s2v import KaleidoPipeline, MagrefPipeline
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.lora_files import detect_format, load_loras, parse_lora_spec, unload_loras
from kaleido_s2v.tiny import tiny_components, tiny_magref_components

RANK, ALPHA = 4, 2.0  # alpha / rank = 0.5
# Wan original name -> diffusers name (diffusers' _convert_non_diffusers_wan_lora_to_diffusers), 2-layer model
_QKVO = [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")]
_BLOCK = [(f"self_attn.{w}", f"attn1.{d}") for w, d in _QKVO] + [(f"cross_attn.{w}", f"attn2.{d}") for w, d in _QKVO]
_BLOCK += [("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
MODULES = [(f"blocks.{i}.{w}", f"blocks.{i}.{d}") for i in range(2) for w, d in _BLOCK]
MODULES += [("head.head", "proj_out"), ("time_projection.1", "condition_embedder.time_proj")]
I2V = [
    (f"blocks.{i}.cross_attn.{w}", f"blocks.{i}.attn2.{d}")
    for i in range(2)
    for w, d in [("k_img", "add_k_proj"), ("v_img", "add_v_proj")]
]


def kaleido():
    return KaleidoPipeline(**tiny_components(seed=0))


def magref():
    return MagrefPipeline(**tiny_magref_components(seed=0))


def forward(transformer):
    g = torch.Generator().manual_seed(1)
    channels = transformer.config.in_channels
    kwargs = dict(
        hidden_states=torch.randn(1, channels, 2, 4, 4, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, transformer.config.text_dim, generator=g),
        return_dict=False,
    )
    if transformer.config.image_dim:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 5, transformer.config.image_dim, generator=g)
    with torch.no_grad():
        return transformer(**kwargs)[0]


def random_lora(transformer, seed, modules=MODULES):
    """{(wan name, diffusers name): (A (rank, in), B (out, rank))}, B non-zero."""
    g, named = torch.Generator().manual_seed(seed), dict(transformer.named_modules())
    return {
        (w, d): (
            torch.randn(RANK, named[d].in_features, generator=g) * 0.2,
            torch.randn(named[d].out_features, RANK, generator=g) * 0.2,
        )
        for w, d in modules
    }


def write(path, lora, fmt):
    """Save `lora` in `fmt`; returns the factor alpha / rank the format applies (1 where it carries no alpha)."""
    sd = {}
    for (wan, diff), (a, b) in lora.items():
        if fmt in ("diffusers", "peft"):  # peft: get_peft_model_state_dict names, without `transformer.`
            key = diff if fmt == "peft" else f"transformer.{diff}"
            sd |= {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        elif fmt == "wan":
            sd |= {
                f"diffusion_model.{wan}.lora_down.weight": a,
                f"diffusion_model.{wan}.lora_up.weight": b,
                f"diffusion_model.{wan}.alpha": torch.tensor(ALPHA),
            }
        elif fmt == "wan_ab":  # LightX2V / CausVid: lora_A / lora_B, no alpha
            sd |= {f"diffusion_model.{wan}.lora_A.weight": a, f"diffusion_model.{wan}.lora_B.weight": b}
        else:  # kohya
            key = "lora_unet_" + wan.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(sd, str(path))
    return ALPHA / RANK if fmt in ("wan", "kohya") else 1.0


def merged(transformer, *loras):
    """A copy of `transformer` with W + scale * factor * B @ A merged by hand; loras: (lora, scale * factor)."""
    copy_ = copy.deepcopy(transformer)
    named = dict(copy_.named_modules())
    with torch.no_grad():
        for lora, factor in loras:
            for (_, diff), (a, b) in lora.items():
                named[diff].weight += factor * (b @ a)
    return copy_


FORMAT = {"diffusers": "diffusers", "peft": "diffusers", "wan": "wan", "wan_ab": "wan", "kohya": "kohya"}
FORMATS = list(FORMAT)


def test_parse_lora_spec(tmp_path):
    f = tmp_path / "a:b.safetensors"
    save_file({"x": torch.zeros(1)}, str(f))
    assert parse_lora_spec(str(f)) == (f, 1.0)
    assert parse_lora_spec(f"{f}:0.5") == (f, 0.5)
    assert parse_lora_spec(f"{f}:-1e-1") == (f, -0.1)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("{d}/missing.safetensors", "no file"),
        ("{f}:strong", "not a number"),
        ("{f}:nan", "not finite"),
        ("{pt}", ".safetensors"),
        ("{f}:inf", "finite"),
    ],
)
def test_parse_lora_spec_errors(tmp_path, spec, words):
    f, pt = tmp_path / "s.safetensors", tmp_path / "s.pt"
    f.touch()
    pt.touch()
    spec = spec.format(d=tmp_path, f=f, pt=pt)
    with pytest.raises(UserInputError, match=words) as e:
        parse_lora_spec(spec)
    assert str(e.value).startswith(f"--lora {spec}:") and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(tmp_path, fmt):
    from safetensors.torch import load_file

    write(tmp_path / "l.safetensors", random_lora(kaleido().transformer, 0, MODULES[:2]), fmt)
    assert detect_format(load_file(tmp_path / "l.safetensors")) == FORMAT[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_equals_hand_merge_and_unloads(tmp_path, fmt):
    pipe = kaleido()
    base = forward(pipe.transformer)
    lora = random_lora(pipe.transformer, 0)
    factor = write(tmp_path / f"style-{fmt}.safetensors", lora, fmt)
    expected = forward(merged(pipe.transformer, (lora, 0.7 * factor)))

    records = load_loras(pipe, [f"{tmp_path}/style-{fmt}.safetensors:0.7"])
    assert records == [
        {
            "file": str(tmp_path / f"style-{fmt}.safetensors"),
            "scale": 0.7,
            "format": FORMAT[fmt],
            "adapter": f"style_{fmt}",
            "modules": len(MODULES),
        }
    ]
    out = forward(pipe.transformer)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    unload_loras(pipe)
    assert torch.equal(forward(pipe.transformer), base)


def test_two_files_combine_with_their_scales(tmp_path):
    pipe = kaleido()
    (tmp_path / "b").mkdir()
    one, two = random_lora(pipe.transformer, 1), random_lora(pipe.transformer, 2, MODULES[:10])
    f1 = write(tmp_path / "style.safetensors", one, "wan")
    f2 = write(tmp_path / "b" / "style.safetensors", two, "kohya")
    expected = forward(merged(pipe.transformer, (one, 0.5 * f1), (two, -1.2 * f2)))
    records = load_loras(pipe, [f"{tmp_path}/style.safetensors:0.5", f"{tmp_path}/b/style.safetensors:-1.2"])
    assert [r["adapter"] for r in records] == ["style", "style_2"] and records[1]["modules"] == 10
    torch.testing.assert_close(forward(pipe.transformer), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["wan", "diffusers", "kohya"])
def test_magref(tmp_path, fmt):
    pipe = magref()
    base = forward(pipe.transformer)
    lora = random_lora(pipe.transformer, 3, MODULES + I2V)  # incl. the image branch: cross_attn.k_img / v_img
    factor = write(tmp_path / "m.safetensors", lora, fmt)
    expected = forward(merged(pipe.transformer, (lora, 1.5 * factor)))
    assert load_loras(pipe, [f"{tmp_path}/m.safetensors:1.5"])[0]["modules"] == len(MODULES + I2V)
    torch.testing.assert_close(forward(pipe.transformer), expected, atol=1e-5, rtol=1e-4)
    unload_loras(pipe)
    assert torch.equal(forward(pipe.transformer), base)


def test_lightx2v_style_bias_diffs_and_zero_norm_diffs(tmp_path):
    from safetensors.torch import load_file

    pipe = kaleido()
    lora = random_lora(pipe.transformer, 4, MODULES[:3])
    write(tmp_path / "x.safetensors", lora, "wan_ab")
    sd = load_file(tmp_path / "x.safetensors")
    bias = torch.randn(24, generator=torch.Generator().manual_seed(5))
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = bias  # applied as the LoRA's bias (diffusers)
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(24)  # dropped by diffusers: fine when zero
    sd["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.zeros(24)
    save_file(sd, str(tmp_path / "x.safetensors"))
    reference = merged(pipe.transformer, (lora, 1.0))
    with torch.no_grad():
        reference.blocks[0].attn1.to_q.bias += bias
    load_loras(pipe, [str(tmp_path / "x.safetensors")])
    torch.testing.assert_close(forward(pipe.transformer), forward(reference), atol=1e-5, rtol=1e-4)

    unload_loras(pipe)
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.ones(24)
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserInputError, match="norm3.diff' is not zero"):
        load_loras(pipe, [str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize(
    "fmt, key, words",
    [
        ("wan", "diffusion_model.blocks.99.self_attn.q.lora_down.weight", "matches no module"),
        ("kohya", "lora_unet_blocks_0_self_attn_qq.lora_down.weight", "matches no module"),
        ("diffusers", "transformer.blocks.0.attn1.to_q.lora_A.weight", "shapes"),  # a LoRA for a wider model
        ("diffusers", "transformer.blocks.0.attn1.to_qq.lora_A.weight", "matches no module"),
        ("wan", "diffusion_model.blocks.0.self_attn.q.dora_scale", "not a LoRA weight"),
        (None, "model.layers.0.q_proj.weight", "unknown key format"),
    ],
)
def test_bad_files_are_refused_before_anything_loads(tmp_path, fmt, key, words):
    from safetensors.torch import load_file

    pipe = kaleido()
    good = tmp_path / "good.safetensors"
    write(good, random_lora(pipe.transformer, 0, MODULES[:2]), fmt or "wan")
    sd = load_file(good) if fmt else {}
    width = 48 if words == "shapes" else 24
    sd[key] = torch.ones(RANK, width)
    sd[key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")] = torch.ones(width, RANK)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(UserInputError, match=words) as e:
        load_loras(pipe, [str(good), str(bad)])
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not getattr(pipe.transformer, "peft_config", None)  # the good file was not loaded either


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="cannot read"):
        load_loras(kaleido(), [str(tmp_path / "junk.safetensors")])
