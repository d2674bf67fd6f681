"""Resuming a fit: the manifest a fit writes when it starts, and the checks that make ``--resume`` safe.

A fit is deterministic given its settings, its images and the vendor's answers, and every paid answer is in
the query cache. So resuming is replaying: the same fit runs again, the cache answers everything paid before
the interruption for free, and the vendor is paid only for the rest. The result is byte for byte the adapter
the uninterrupted fit would have written. What must not change in between is recorded in ``<adapter>.fitrun.json``
(plain JSON, no secrets): the settings that decide the result, the backend's identity, a hash of the few-shot
images and labels, and how the fit was invoked, so ``fit -o ADAPTER --resume`` needs nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from craft_adapter.blackbox.query_cache import digest, image_key
from craft_adapter.training.config import operational_settings

MANIFEST_VERSION = 1


class ResumeError(ValueError):
    """There is nothing to resume, or what would be resumed differs from what was started."""


def manifest_path(output: Path) -> Path:
    """Where the fit writing ``output`` keeps its manifest."""
    return output.with_name(output.name + ".fitrun.json")


def train_digest(images: Sequence[Image.Image], labels: np.ndarray, class_names: Sequence[str]) -> str:
    """A hash of the few-shot set: every image's pixels, its label, and the class list."""
    return digest(*(image_key(im) for im in images), np.asarray(labels, np.int64).tobytes(), *class_names)


@dataclass
class FitRun:
    """What a started fit records so that ``--resume`` can repeat it exactly."""

    config: dict[str, Any]  # FitConfig.to_dict(): the settings that decide the result
    backend: dict[str, Any]  # the backend's identity (URLs redacted)
    train: str  # train_digest of the few-shot set
    invocation: dict[str, Any] = field(default_factory=dict)  # data, model, vendor, cache...: no secrets
    status: str = "running"  # running | done
    version: int = MANIFEST_VERSION

    def save(self, path: Path) -> None:
        """Write atomically (a kill never leaves half a manifest)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FitRun:
        """Read a manifest, or raise :class:`ResumeError` saying why there is nothing to resume."""
        if not path.is_file():
            raise ResumeError(f"nothing to resume: no {path.name} beside the output (a fit writes it when it "
                              "starts); run without --resume to start the fit")
        try:
            data = json.loads(path.read_text())
            run = cls(**data)
        except (ValueError, TypeError) as e:
            raise ResumeError(f"{path} is not a readable fit manifest ({e}); run without --resume") from None
        if run.version > MANIFEST_VERSION:
            raise ResumeError(f"{path} was written by a newer craft-adapter; upgrade to resume it")
        return run

    def conflicts(self, config: Mapping[str, Any], backend: Mapping[str, Any], train: str) -> list[str]:
        """How a resumed fit would differ from the one started (empty when it may resume)."""
        found = [f"{k} is {config.get(k)!r}, the fit was started with {v!r}"
                 for k, v in sorted(self.config.items()) if k not in operational_settings() and config.get(k) != v]
        found += [f"setting {k} is new" for k in sorted(set(config) - set(self.config) - set(operational_settings()))]
        if dict(backend) != self.backend:
            found.append(f"the backend is {dict(backend)}, the fit was started against {self.backend}")
        if train != self.train:
            found.append("the few-shot images or labels differ from the ones the fit was started with")
        return found
