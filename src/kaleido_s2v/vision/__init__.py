"""Thin wrappers over transformers vision models loaded from LOCAL folders (no network).

Shared by evaluation (`kaleido_s2v.evaluation`) and data curation. Every wrapper takes images as a list of
PIL images or an (N, H, W, 3) uint8 array, batches internally, and returns plain tensors / lists:

- `CLIP(path)`: `embed_images`, `embed_texts` (L2-normalised), `vbench_pixels` (VBench's CLIP transform)
- `DINO(path)`: `embed_frames` (VBench preprocessing: short side 224, no crop, DINO v1 position interpolation)
- `GroundingDINO(path)`: `detect(images, phrases, box_threshold, text_threshold)` -> per image [Detection]
- `SAM(path)`: `segment(images, boxes)` -> per image (masks bool (n, H, W), iou scores (n,)); SAM and SAM 2
"""

from .clip import CLIP
from .common import load_folder_check, to_pil_list, to_uint8_array
from .dino import DINO
from .grounding import Detection, GroundingDINO
from .segment import SAM

__all__ = ["CLIP", "DINO", "SAM", "Detection", "GroundingDINO", "load_folder_check", "to_pil_list", "to_uint8_array"]
