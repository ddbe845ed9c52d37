"""The release's facts: the sampling grid's pinned values (reference/kaleido-official.md §3), and that everything
that takes the release's settings takes them from `kaleido_s2v.release`."""

import numpy as np
import pytest

from kaleido_s2v.release import GENERATION_DEFAULTS, KALEIDO_NEGATIVE_PROMPT, REF_ROPE_OFFSET, SHIFT, official_sigmas


def test_official_sigmas_are_pinned():
    sigma = official_sigmas(50)
    assert sigma.shape == (51,) and sigma[0] == 1.0 and sigma[-1] == 0.0
    assert sigma[1] == pytest.approx(0.99709, abs=1e-5)
    assert sigma[25] == pytest.approx(0.875, abs=1e-12) and sigma[49] == pytest.approx(0.125, abs=1e-12)
    with pytest.raises(ValueError):
        official_sigmas(0)


def test_the_pipeline_samples_on_that_grid():
    from kaleido_s2v import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components

    pipe = KaleidoPipeline(**tiny_components(seed=0))
    for steps in (50, 4):
        timesteps = pipe.set_official_timesteps(steps).numpy()
        # float32 storage of the float64 grid: relative error below float32's epsilon
        np.testing.assert_allclose(timesteps, 1000 * official_sigmas(steps)[:-1], rtol=np.finfo(np.float32).eps)
    assert pipe.scheduler.config.shift == SHIFT


def test_components_and_defaults_carry_the_release_settings():
    import inspect

    from kaleido_s2v import KaleidoPipeline, KaleidoTransformer3DModel
    from kaleido_s2v.tiny import tiny_scheduler, tiny_transformer_config

    call = inspect.signature(KaleidoPipeline.__call__).parameters
    for key in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "max_sequence_length"):
        assert call[key].default == GENERATION_DEFAULTS[key]
    assert GENERATION_DEFAULTS["negative_prompt"] == KALEIDO_NEGATIVE_PROMPT
    init = inspect.signature(KaleidoTransformer3DModel.__init__).parameters
    assert init["ref_rope_offset"].default == REF_ROPE_OFFSET == tiny_transformer_config()["ref_rope_offset"]
    assert tiny_scheduler().config.shift == SHIFT
