"""Box-prompted segmentation with SAM (`SamModel`) or SAM 2 (`Sam2Model`) from a local folder."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from .common import Images, batches, load_folder_check, resolve_device, to_pil_list

Box = Sequence[float]  # x0, y0, x1, y1 in pixels


class SAM:
    """SAM (facebook/sam-vit-*) or SAM 2 (facebook/sam2.1-hiera-*), picked from the folder's config.json.

    SAM 2 needs torchvision (transformers 5.23 has only a torchvision Sam2ImageProcessor); its path is untested
    in this project's CPU environment, which has no torchvision.

    `segment(images, boxes)` embeds the images in batches once, then decodes one mask per box
    (`multimask_output=False`), upsampled to the image size and binarised at logit 0.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype = torch.float32, role: str = "sam"):
        from transformers import AutoProcessor

        path = load_folder_check(path, role)
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "sam")
        self.is_sam2 = model_type.startswith("sam2")
        if self.is_sam2:
            import importlib.util

            if importlib.util.find_spec("torchvision") is None:
                raise UserInputError(f"SAM 2 folder '{path}' needs torchvision (transformers' Sam2ImageProcessor): "
                                     f"install torchvision or give a SAM (SamModel) folder")
            from transformers import Sam2Model as Model
        else:
            from transformers import SamModel as Model
        self.device = resolve_device(device)
        self.model = Model.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.dtype = dtype

    @torch.no_grad()
    def segment(self, images: Images, boxes: Sequence[Sequence[Box]],
                batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
        """For image i and its boxes[i] (possibly empty): (masks bool (n, H, W), predicted IoU (n,)).

        Images with the same number of boxes are preprocessed, embedded and decoded together, `batch_size` at a
        time (each image is embedded once, whatever its number of boxes).
        """
        pils = to_pil_list(images)
        if len(boxes) != len(pils):
            raise ValueError(f"segment() got {len(pils)} images but {len(boxes)} box lists")
        out: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros((0, im.size[1], im.size[0]), bool), np.zeros(0, np.float32)) for im in pils]
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(boxes):
            if len(b):
                groups.setdefault(len(b), []).append(i)
        for ids in groups.values():
            for sl in batches(len(ids), batch_size):
                chunk = ids[sl]
                for i, res in zip(chunk, self._segment_batch([pils[i] for i in chunk], [boxes[i] for i in chunk])):
                    out[i] = res
        return out

    def _segment_batch(self, images, boxes):
        enc = self.processor(images=images, input_boxes=[[list(map(float, b)) for b in bx] for bx in boxes],
                             return_tensors="pt")
        embeddings = self.model.get_image_embeddings(enc["pixel_values"].to(self.device, self.dtype))
        outputs = self.model(input_boxes=enc["input_boxes"].to(self.device, self.dtype),
                             image_embeddings=embeddings, multimask_output=False)
        pred = outputs.pred_masks.float().cpu()
        if self.is_sam2:
            masks = self.processor.post_process_masks(pred, enc["original_sizes"].cpu())
        else:
            masks = self.processor.image_processor.post_process_masks(pred, enc["original_sizes"].cpu(),
                                                                      enc["reshaped_input_sizes"].cpu())
        ious = outputs.iou_scores[:, :, 0].float().cpu().numpy()
        return [(m[:, 0].numpy().astype(bool), q) for m, q in zip(masks, ious)]
