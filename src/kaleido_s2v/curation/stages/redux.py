"""`redux`: new appearance/pose variants of each kept subject with FLUX.1 Redux through diffusers.

`FluxPriorReduxPipeline` (folder `prior_model`, FLUX.1-Redux-dev) turns the segmented reference (on white) into
prompt embeddings; `FluxPipeline` (folder `model`, FLUX.1-dev, loaded without its text encoders) renders the
variant — the call pattern of the diffusers docstring (guidance 2.5, 50 steps). Output:
`subjects/<clip_id>/redux_<i>.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserInputError
from ..stage import Stage
from ..tasks import Clip
from .ground import save_png
from .inpaint import fit16


@dataclass
class ReduxStage(Stage):
    name = "redux"
    uses_model = True

    model: str = ""  # FLUX.1-dev diffusers folder (text encoders not needed)
    prior_model: str = ""  # FLUX.1-Redux-dev diffusers folder
    guidance_scale: float = 2.5
    num_inference_steps: int = 50
    size: int = 768
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def inputs(self) -> list[str]:
        return ["subjects"]

    def outputs(self) -> list[str]:
        return ["subjects"]

    def check(self) -> None:
        self.require_model(self.model)
        self.require_model(self.prior_model, key="prior_model")
        if self.size < 16:
            raise UserInputError(f"redux.size must be >= 16, got {self.size}")

    def setup(self) -> None:
        if getattr(self, "_pipe", None) is not None:
            return
        from diffusers import FluxPipeline, FluxPriorReduxPipeline

        from ...vision.common import resolve_device, resolve_dtype

        self._device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, self._device)
        self._prior = FluxPriorReduxPipeline.from_pretrained(self.prior_model, dtype=dtype).to(self._device)
        self._pipe = FluxPipeline.from_pretrained(self.model, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                  tokenizer_2=None, dtype=dtype).to(self._device)
        self._pipe.set_progress_bar_config(disable=True)

    def process(self, clip: Clip) -> Clip:
        import torch
        from PIL import Image

        for i, s in enumerate(clip.fields.get("subjects") or []):
            s.pop("redux", None)
            ref = (s.get("refs") or {}).get("segment")
            if s.get("status") != "kept" or not ref:
                continue
            image = Image.open(Path(self.output_dir) / ref).convert("RGB")
            W, H = fit16(image.width, image.height, self.size)
            prior_out = self._prior(image)
            gen = torch.Generator("cpu").manual_seed(self.seed + i)
            out = self._pipe(guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                             height=H, width=W, generator=gen, **prior_out).images[0]
            name = f"redux_{i}.png"
            save_png(self.subjects_dir(clip) / name, np.asarray(out.convert("RGB")))
            s["redux"] = {"path": f"subjects/{clip.clip_id}/{name}"}
        return clip
