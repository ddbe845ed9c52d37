"""Box-prompted segmentation with SAM (`SamModel`) or SAM 2 (`Sam2Model`) from a local folder."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .common import Images, batches, load_folder_check, resolve_device, to_pil_list

Box = Sequence[float]  # x0, y0, x1, y1 in pixels


class SAM:
    """SAM (facebook/sam-vit-*) or SAM 2 (facebook/sam2.1-hiera-*), picked from the folder's config.json.

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
        """For image i and its boxes[i] (possibly empty): (masks bool (n, H, W), predicted IoU (n,))."""
        pils = to_pil_list(images)
        if len(boxes) != len(pils):
            raise ValueError(f"segment() got {len(pils)} images but {len(boxes)} box lists")
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for sl in batches(len(pils), batch_size):
            chunk, chunk_boxes = pils[sl], boxes[sl]
            todo = [j for j, b in enumerate(chunk_boxes) if len(b)]
            res = {j: (np.zeros((0, im.size[1], im.size[0]), bool), np.zeros(0, np.float32))
                   for j, im in enumerate(chunk)}
            if todo:
                enc = self.processor(images=[chunk[j] for j in todo], return_tensors="pt")
                px = enc["pixel_values"].to(self.device, self.dtype)
                embeddings = self.model.get_image_embeddings(px)
                for k, j in enumerate(todo):
                    res[j] = self._decode(chunk[j], chunk_boxes[j], embeddings, k, enc)
            out.extend(res[j] for j in range(len(chunk)))
        return out

    def _decode(self, image, boxes, embeddings, k, enc):
        prompt = self.processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]],
                                return_tensors="pt")
        input_boxes = prompt["input_boxes"].to(self.device, self.dtype)
        if self.is_sam2:
            emb = [e[k:k + 1] for e in embeddings]
        else:
            emb = embeddings[k:k + 1]
        outputs = self.model(input_boxes=input_boxes, image_embeddings=emb, multimask_output=False)
        if self.is_sam2:
            masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(),
                                                      prompt["original_sizes"].cpu())[0]
        else:
            masks = self.processor.image_processor.post_process_masks(
                outputs.pred_masks.float().cpu(), prompt["original_sizes"].cpu(),
                enc["reshaped_input_sizes"][k:k + 1].cpu())[0]
        masks = masks[:, 0].numpy().astype(bool)  # (n, H, W)
        ious = outputs.iou_scores[0, :, 0].float().cpu().numpy()
        return masks, ious
