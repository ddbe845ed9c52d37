"""MAGREF (MAGREF-Video/MAGREF): references composited on one masked canvas, channel-concatenated into Wan2.1
image-to-video. `MagrefPipeline`, `compose_references` and the release's constants (`release`)."""

from .canvas import LAYOUTS, compose_references, latent_mask

__all__ = ["LAYOUTS", "MagrefPipeline", "compose_references", "latent_mask"]


def __getattr__(name):  # the pipeline pulls in diffusers: loaded when used
    if name == "MagrefPipeline":
        from .pipeline import MagrefPipeline

        return MagrefPipeline
    raise AttributeError(f"module 'kaleido_s2v.magref' has no attribute {name!r}")
