"""craft-adapter: CraFT fine-tuning of black-box vision-language models.

``from craft_adapter import fit_adapter, FitConfig`` is the Python entry point (see
:mod:`craft_adapter.training.api`). Those names are imported on first use, through the module ``__getattr__``,
so ``import craft_adapter`` (and ``import craft_adapter.serve``, the torch-free runtime) loads neither torch nor
training code. Importing the package changes no process-wide setting: the threading policy is set where a fit
starts (:func:`craft_adapter.training.api.use_passive_omp_wait`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = "craft_adapter.training.api"
_LAZY = {
    "fit_adapter": _API, "FitOutcome": _API, "FitRecord": _API, "FitError": _API, "SettingsError": _API,
    "VendorStopped": _API, "CacheFailed": _API, "ResumeConflict": _API, "use_passive_omp_wait": _API,
    "FitConfig": "craft_adapter.training.config", "LabeledImages": "craft_adapter.training.image_sets",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'craft_adapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
