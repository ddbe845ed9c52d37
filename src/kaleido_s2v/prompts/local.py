"""A local transformers chat model as the enhancer (`--enhancer DIR`): a vision-language model that sees the
references (Qwen2.5-VL / Qwen3-VL class, `AutoModelForImageTextToText`) or a text-only instruct model (Qwen2.5 /
Qwen3 class, `AutoModelForCausalLM`) that sees only the prompt, each with the folder's own tokenizer, processor
and chat template.

Greedy decoding by default (the same prompt gives the same caption), sampling with a seed; bf16 on CUDA, fp32 on
the CPU. The model loads on the first request and `close()` frees it (and the CUDA cache): `generate` runs it
before the video model loads, so a 24 GB card holds one of them at a time.

Qwen-VL processors build a video processor that needs torchvision; where that is missing (the CPU torch build)
the image inputs are made here from the folder's image processor and tokenizer, as the processor would make them.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from ..errors import UserInputError
from ..fileio import path_text
from .base import Answer, Enhancer, file_sha256

MAX_NEW_TOKENS = 400  # ~150 words is ~200 tokens: room for a longer answer, bounded
EXAMPLE = "a chat model folder such as Qwen2.5-VL-7B-Instruct"


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: {path.name} is not valid JSON: restore or re-download the folder")
    return data


def chat_template(folder: Path) -> str | None:
    """The folder's chat template, wherever transformers keeps it (the tokenizer's, or the processor's file)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        if (folder / name).is_file():
            try:
                template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str) and template.strip():
                return template
    return None


def check_chat_folder(folder: str | Path, flag: str = "--enhancer") -> bool:
    """Check that `folder` is a local chat model transformers can run, without loading it; True for a
    vision-language model. Every problem is one line naming `flag` and the fix."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    folder = Path(folder)
    where = f"{flag} '{path_text(folder)}'"
    if not folder.exists():
        raise UserInputError(f"{where} does not exist: give {EXAMPLE} (models load from local folders only), "
                             "or a server with --enhancer-url")
    if not folder.is_dir():
        raise UserInputError(f"{where} is a file: give the model's folder ({EXAMPLE})")
    if not (folder / "config.json").is_file():
        what = "a diffusers pipeline folder (a video model)" if (folder / "model_index.json").is_file() else \
            "not a transformers model folder (no config.json)"
        raise UserInputError(f"{where} is {what}, not a chat model: give {EXAMPLE}")
    config = _read_json(folder / "config.json", where)
    model_type = config.get("model_type")
    vlm = model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and (
        "vision_config" in config or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not vlm and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserInputError(f"{where} holds a {model_type or 'model without a model_type'}, not a chat model "
                             f"transformers can generate text with: give {EXAMPLE}, or serve the model behind "
                             "--enhancer-url")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserInputError(f"{where} has no weights (*.safetensors): restore or re-download the folder")
    if chat_template(folder) is None:
        raise UserInputError(f"{where} has no chat template (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json's): give an instruct model folder (…-Instruct), not a base model")
    return vlm


class LocalEnhancer(Enhancer):
    def __init__(self, folder: str | Path, *, device=None, seed: int | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, text_only: bool = False, flag: str = "--enhancer"):
        self.folder, self.flag = Path(folder), flag
        self.vlm = check_chat_folder(self.folder, flag)  # how it loads; `text_only`: shown no images all the same
        self.sees_images = self.vlm and not text_only
        self.device, self.seed, self.max_new_tokens = device, seed, max_new_tokens
        self.model = self.tokenizer = self.image_processor = self.processor = None

    # -------------------------------------------------------------------------------------------- what it is
    def record(self) -> dict:
        return {"kind": "local", "path": path_text(self.folder.resolve()), "model": self.folder.resolve().name,
                "sees_images": self.sees_images, "seed": self.seed}

    def identity(self) -> dict:
        files = ("config.json", "generation_config.json", "model.safetensors.index.json")
        return {**self.record(), "max_new_tokens": self.max_new_tokens,
                "files": {f: file_sha256(self.folder / f) for f in files if (self.folder / f).is_file()}}

    # -------------------------------------------------------------------------------------------- running
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        import torch
        import transformers

        from ..model_folder import loading

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        auto = transformers.AutoModelForImageTextToText if self.vlm else transformers.AutoModelForCausalLM
        with loading(self.folder, self.flag):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
            if self.vlm:
                try:
                    self.processor = transformers.AutoProcessor.from_pretrained(self.folder)
                except ImportError:  # a video processor that needs torchvision: images through the parts below
                    self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.folder)
            placed = {"device_map": str(device)} if device.type == "cuda" else {}  # straight onto the GPU
            self.model = auto.from_pretrained(self.folder, dtype=dtype, **placed).to(device).eval()
        self.device = device

    def close(self) -> None:
        if self.model is None:
            return
        import torch

        self.model = self.tokenizer = self.image_processor = self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def answer(self, system: str, user: str, images: list) -> Answer:
        import torch

        if self.model is None:
            self.load()
        images = images if self.sees_images else []
        if self.vlm:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": user}]
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                        {"role": "user", "content": content}]
        else:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        inputs = self._inputs(messages, images)
        sampling = {"do_sample": True} if self.seed is not None else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.seed is not None:
            torch.manual_seed(self.seed)
        with torch.no_grad():
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling, pad_token_id=pad)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Answer(text, truncated=len(new) >= self.max_new_tokens)

    def _inputs(self, messages: list, images: list) -> dict:
        """Token ids (and image tensors) of one chat on the model's device; `enable_thinking=False` asks Qwen3's
        templates for the answer alone (other templates ignore it)."""
        template = dict(add_generation_prompt=True, tokenize=False, enable_thinking=False)
        if self.processor is not None:
            text = self.processor.apply_chat_template(messages, **template)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        else:
            own = None if self.tokenizer.chat_template else chat_template(self.folder)
            text = self.tokenizer.apply_chat_template(messages, chat_template=own, **template)
            inputs = self._image_inputs(text, images) if images else self.tokenizer([text], return_tensors="pt")
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    def _image_inputs(self, text: str, images: list) -> dict:
        """What a Qwen-VL processor returns for one text with images: each image placeholder repeated once per
        merged patch of its grid, and the token types that mark image tokens (M-RoPE needs them)."""
        pixels = self.image_processor(images=images, return_tensors="pt")
        token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
        parts = text.split(token)
        if len(parts) != len(images) + 1:
            raise UserInputError(f"{self.flag} '{path_text(self.folder)}': its chat template placed "
                                 f"{len(parts) - 1} image tokens for {len(images)} images: give a Qwen-VL class "
                                 "model, or install torchvision so that its own processor runs")
        merge = self.image_processor.merge_size ** 2
        grid = pixels["image_grid_thw"]
        text = parts[0] + "".join(token * int(grid[j].prod() // merge) + parts[j + 1] for j in range(len(images)))
        encoded = self.tokenizer([text], return_tensors="pt")
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.tokenizer.convert_tokens_to_ids(token)).int()
        return {**encoded, **pixels}
