"""The model under training as a `vitrine.protocols.Encoder`.

Validation and α tuning then run the same evaluator objects (`vitrine.evaluation`) that
`vitrine eval` runs on an exported bundle.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from trainer.features import choose_trunk

TRUNK_ONNX_MIN_BATCH = 16  # below this the ONNX export of the trunk costs more than it saves


class ModelEncoder:
    """encode_texts / encode_images of a `VitrineModel` in eval mode (float32, unit rows)."""

    def __init__(
        self,
        model,
        embed_texts: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        device: torch.device,
        name: str,
    ) -> None:
        self.model, self.embed_texts, self.preprocess, self.device, self.name = model, embed_texts, preprocess, device, name
        self._trunk: Callable[[torch.Tensor], torch.Tensor] | None = None

    def describe(self) -> str:
        return f"training model {self.name}"

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        return self.embed_texts(list(texts)).float().cpu().numpy()

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        self.model.eval()
        pixels = torch.stack([self.preprocess(image) for image in images])
        feats = self._trunk_for(pixels)(pixels.to(self.device))
        return self.model.encode_image_features(feats.to(self.device)).float().cpu().numpy()

    def _trunk_for(self, pixels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """On a CPU the ONNX-run trunk (checked against torch once), as the feature cache uses."""
        if self._trunk is None:
            if self.device.type == "cpu" and pixels.shape[0] >= TRUNK_ONNX_MIN_BATCH:
                self._trunk = choose_trunk(self.model, pixels[:4])
            else:
                return self.model.image_trunk_features
        return self._trunk
