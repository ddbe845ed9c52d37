"""`caption`: a subject-centric caption from a vision-language model in a local folder.

Built for Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, the captioner of OpenS2V and NeMo Curator) but
loaded generically with `AutoModelForImageTextToText` + `AutoProcessor`, so any transformers VLM with a chat
template works. `num_frames` frames spread over the clip are given as images (OpenS2V samples 16; 8 keeps the
prompt short); clips are captioned in batches of `batch_size` with greedy decoding. The caption is one line
(Kaleido's loader reads only the first line of a label).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserInputError
from ..frames import sample_frames
from ..stage import Stage
from ..tasks import Clip

PROMPT = ("Describe this video in one paragraph. Name every main subject (people, animals, objects, garments) "
          "with its appearance, say what each one does, then the setting and the camera motion. "
          "No lists, no headings.")


@dataclass
class CaptionStage(Stage):
    name = "caption"
    uses_model = True

    model: str = ""
    prompt: str = PROMPT
    num_frames: int = 8
    max_side: int = 448  # frames are downscaled so the longer side is at most this (fewer vision tokens)
    max_new_tokens: int = 160
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    batch_size: int = 4

    def inputs(self) -> list[str]:
        return []

    def outputs(self) -> list[str]:
        return ["caption", "captioner"]

    def check(self) -> None:
        self.require_model(self.model)
        if self.num_frames < 1:
            raise UserInputError(f"caption.num_frames must be >= 1, got {self.num_frames}")

    def setup(self) -> None:
        if getattr(self, "_model", None) is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ...vision.common import load_folder_check, resolve_device, resolve_dtype

        path = load_folder_check(self.model, "caption.model")
        self._device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, self._device)
        self._processor = AutoProcessor.from_pretrained(path)
        self._processor.tokenizer.padding_side = "left"  # batched generation
        self._model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(self._device).eval()

    def _images(self, clip: Clip):
        from PIL import Image

        out = []
        for _, f in sample_frames(clip.source, clip.start_s, clip.end_s, self.num_frames):
            im = Image.fromarray(f)
            scale = self.max_side / max(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            out.append(im)
        return out

    def process(self, clip: Clip) -> Clip:
        return self.process_batch([clip])[0]

    def process_batch(self, clips: list[Clip]) -> list[Clip]:
        import torch

        todo, images = [], []
        for c in clips:
            try:
                ims = self._images(c)
            except UserInputError as e:
                c.fields["caption"] = None
                c.fields["caption_error"] = str(e)
                c.reject("unreadable")
                continue
            if not ims:
                c.fields["caption"] = None
                c.reject("no_frames")
                continue
            todo.append(c)
            images.append(ims)
        if not todo:
            return clips
        texts = []
        for ims in images:
            msgs = [{"role": "user", "content": [{"type": "image"} for _ in ims] + [{"type": "text", "text": self.prompt}]}]
            texts.append(self._processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        inputs = self._processor(text=texts, images=[im for ims in images for im in ims], padding=True,
                                 return_tensors="pt").to(self._device)
        with torch.no_grad():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        decoded = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for c, text in zip(todo, decoded):
            caption = " ".join(text.split())
            c.fields["caption"] = caption or None
            c.fields["captioner"] = {"model": str(self.model), "num_frames": self.num_frames}
            if not caption:
                c.reject("no_caption")
        return clips
