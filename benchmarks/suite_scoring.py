"""An in-process zero-shot scoring vendor for the suite's text-mode rows: the task's open_clip model answering as a
Hugging Face zero-shot endpoint would (one image and the class prompts per call, a softmax over them), so vendor
calls are counted as a string-only vendor bills them, without an HTTP server per task.

Image and prompt embeddings are memoised (the model is deterministic), so 20,000 calls cost milliseconds each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from craft_adapter.vendors.protocols import Capabilities, fill


class InProcessZeroShot:
    """A scoring-style backend over an in-process :class:`OpenClipBackend`."""

    capabilities = Capabilities(style="scoring", returns="probabilities")

    def __init__(self, backend) -> None:
        self.backend = backend
        self.identity = {"name": "in-process-zero-shot", "model": backend.identity}
        self._images: dict[int, tuple[Image.Image, np.ndarray]] = {}
        self._texts: dict[str, np.ndarray] = {}

    def _image(self, image: Image.Image) -> np.ndarray:
        hit = self._images.get(id(image))
        if hit is None or hit[0] is not image:
            hit = (image, self.backend.embed_images([image])[0])
            self._images[id(image)] = hit
        return hit[1]

    def _prompts(self, prompts: list[str]) -> np.ndarray:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if missing:
            for p, e in zip(missing, self.backend.embed_texts(missing), strict=True):
                self._texts[p] = e
        return np.stack([self._texts[p] for p in prompts])

    def score(self, image: Image.Image, labels: Sequence[str], template: str) -> np.ndarray:
        """``softmax(logit_scale * cos)`` of ``image`` over ``template`` filled with each label."""
        z = np.float32(self.backend.logit_scale) * (self._prompts([fill(template, c) for c in labels])
                                                   @ self._image(image))
        e = np.exp(z - z.max())
        return (e / e.sum()).astype(np.float32)
