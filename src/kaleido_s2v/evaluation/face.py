"""Offline face detection (OpenCV Haar cascade) and face embeddings from a local `face` folder.

Folder formats for the `face` role:
- an ArcFace ONNX model (`*.onnx`, e.g. insightface buffalo_l `w600k_r50.onnx`), run with onnxruntime: the
  face crop is resized to the model's input size (112x112), RGB, (x - 127.5) / 127.5, NCHW; output = embedding;
- any transformers image model folder (config.json + preprocessor config), loaded with AutoModel and
  AutoImageProcessor; the embedding is `image_embeds`, else `pooler_output`, else the CLS hidden state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


class FaceDetector:
    """Largest frontal face by box area (Haar cascade), with insightface's grey-padding retry."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size_frac: float = 0.08,
                 pad_frac: float = 0.25, max_side: int = 512):
        try:
            import cv2
        except ImportError as e:
            raise UserInputError("face_similarity needs OpenCV: pip install 'kaleido-s2v[eval]' "
                                 "(opencv-python-headless)") from e
        self.cv2 = cv2
        path = Path(cv2.data.haarcascades) / HAAR_CASCADE
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise UserInputError(f"OpenCV Haar cascade '{path}' missing: install opencv-python-headless<5")
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_size_frac, self.pad_frac, self.max_side = min_size_frac, pad_frac, max_side

    def _detect(self, rgb: np.ndarray):
        gray = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)
        s = min(1.0, self.max_side / max(gray.shape))  # detect on a copy whose longer side is <= max_side
        if s < 1.0:
            gray = self.cv2.resize(gray, (round(gray.shape[1] * s), round(gray.shape[0] * s)),
                                   interpolation=self.cv2.INTER_AREA)
        m = max(16, int(self.min_size_frac * min(gray.shape)))
        faces = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(m, m))
        if len(faces) == 0:
            return None
        x, y, w, h = (float(v) / s for v in max(faces, key=lambda f: f[2] * f[3]))
        return x, y, x + w, y + h

    def largest_face(self, rgb: np.ndarray):
        """(x0, y0, x1, y1) of the largest face, or None."""
        box = self._detect(rgb)
        if box is not None or self.pad_frac <= 0:
            return box
        ph, pw = int(self.pad_frac * rgb.shape[0]), int(self.pad_frac * rgb.shape[1])
        padded = self.cv2.copyMakeBorder(rgb, ph, ph, pw, pw, self.cv2.BORDER_CONSTANT, value=(128, 128, 128))
        box = self._detect(padded)
        if box is None:
            return None
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = box[0] - pw, box[1] - ph, box[2] - pw, box[3] - ph
        return max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))


def crop_face(rgb: np.ndarray, box, margin: float = 0.1) -> np.ndarray:
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = rgb.shape[:2]
    x0, y0 = int(max(0, x0 - mx)), int(max(0, y0 - my))
    x1, y1 = int(min(w, x1 + mx)), int(min(h, y1 + my))
    return np.ascontiguousarray(rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])


class FaceEmbedder:
    def __init__(self, folder: str | Path, device="cpu"):
        folder = Path(folder)
        onnx = sorted(folder.glob("*.onnx")) if folder.is_dir() else []
        self.device = torch.device(device)
        if onnx:
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise UserInputError(f"face model '{onnx[0]}' is ONNX: pip install onnxruntime") from e
            self.session = ort.InferenceSession(str(onnx[0]), providers=["CPUExecutionProvider"])
            inp = self.session.get_inputs()[0]
            self.input_name = inp.name
            self.size = tuple(int(s) if isinstance(s, int) else 112 for s in inp.shape[2:4])
            self.kind, self.name = "onnx", onnx[0].name
        elif folder.is_dir() and (folder / "config.json").is_file():
            from transformers import AutoImageProcessor, AutoModel

            self.model = AutoModel.from_pretrained(folder).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.kind, self.name = "transformers", f"{type(self.model).__name__} ({folder.name})"
        else:
            raise UserInputError(f"face model folder '{folder}' has neither an ArcFace *.onnx nor a transformers "
                                 f"config.json")

    @torch.no_grad()
    def embed(self, crops: list[np.ndarray]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of RGB uint8 face crops."""
        if not crops:
            return torch.zeros(0, 1)
        if self.kind == "onnx":
            import cv2

            x = np.stack([cv2.resize(c, (self.size[1], self.size[0]), interpolation=cv2.INTER_LINEAR)
                          for c in crops]).astype(np.float32)
            x = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2)
            out = torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
        else:
            px = self.processor(images=list(crops), return_tensors="pt")["pixel_values"].to(self.device)
            o = self.model(pixel_values=px)
            out = getattr(o, "image_embeds", None)
            if out is None:
                out = getattr(o, "pooler_output", None)
            if out is None:
                out = o.last_hidden_state[:, 0]
        return F.normalize(out.float().reshape(len(crops), -1), dim=-1).cpu()
