"""What a model folder is and the facts it holds: an official Kaleido release, the built-in folder, Wan2.1 T2V."""

import json

import pytest

from kaleido_s2v.checkpoints.export import save_official_release, save_wan_release
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.model_folder import check_model_folder, facts, resolve_model_folder, size_multiple
from kaleido_s2v.release import GENERATION_DEFAULTS
from kaleido_s2v.tiny import tiny_components, tiny_transformer_config


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


def test_an_official_release_is_named_with_its_convert_command_then_converted(tmp_path, components):
    from kaleido_s2v.checkpoints import convert
    from kaleido_s2v.tiny import tiny_tokenizer
    from tests.test_convert import small_wan_vae, umt5_like_wan

    release = save_official_release(tmp_path / "Kaleido-14B-S2V", components["transformer"].state_dict(),
                                    vae_state_dict=small_wan_vae().state_dict(),
                                    text_encoder_state_dict=umt5_like_wan().state_dict(), tokenizer=tiny_tokenizer())
    with pytest.raises(UserInputError, match="kaleido-s2v convert --src .*Kaleido-14B-S2V --dst"):
        resolve_model_folder(release)
    convert(release, tmp_path / "diffusers", only="transformer,vae", attention_head_dim=12, progress=False)
    f = facts(tmp_path / "diffusers")
    assert f.pipeline_class == "KaleidoPipeline"
    assert (f.vae_stride, f.vae_temporal_stride, f.patch_size, f.size_multiple) == (8, 4, (1, 2, 2), 16)
    assert f.generation_defaults == {}  # the release's settings apply (release.GENERATION_DEFAULTS)
    assert size_multiple(tmp_path / "diffusers") == 16 == size_multiple(None)


def test_the_built_in_folder():
    from kaleido_s2v.builtin import builtin_model_dir

    root = builtin_model_dir()
    if root is None:
        pytest.skip("the built-in weights are not in this checkout")
    f = facts(check_model_folder(root))
    assert f.pipeline_class == "KaleidoPipeline"
    assert (f.vae_stride, f.vae_temporal_stride, f.patch_size, f.size_multiple) == (4, 4, (1, 2, 2), 8)
    saved = json.loads((root / "generation_defaults.json").read_text())
    assert f.generation_defaults == saved and f.generation_defaults["negative_prompt"] == ""
    assert set(f.generation_defaults) <= set(GENERATION_DEFAULTS)


def test_a_wan21_t2v_folder(tmp_path, components):
    from diffusers import WanPipeline, WanTransformer3DModel

    config = {k: v for k, v in tiny_transformer_config().items() if not k.startswith("ref_rope")}
    wan = WanPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                      vae=components["vae"], transformer=WanTransformer3DModel(**config),
                      scheduler=components["scheduler"])
    wan.save_pretrained(tmp_path / "Wan2.1-T2V-diffusers")
    f = facts(check_model_folder(tmp_path / "Wan2.1-T2V-diffusers"))
    assert f.pipeline_class == "WanPipeline"
    assert (f.vae_stride, f.patch_size, f.size_multiple) == (8, (1, 2, 2), 16)
    # the original Wan2.1 release layout (DiT shards + .pth files) is a conversion source, as the Kaleido release
    original = save_wan_release(tmp_path / "Wan2.1-T2V-14B", components["transformer"].state_dict())
    with pytest.raises(UserInputError, match="convert"):
        resolve_model_folder(original)


def test_facts_follow_the_configs(tmp_path, components):
    from kaleido_s2v import KaleidoPipeline

    KaleidoPipeline(**components).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    config["patch_size"] = [1, 4, 4]
    (tmp_path / "m" / "transformer" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "generation_defaults.json").write_text(json.dumps({"num_inference_steps": 4, "other": 1}))
    f = facts(tmp_path / "m")
    assert f.size_multiple == 32 and f.generation_defaults == {"num_inference_steps": 4}  # unknown keys dropped
