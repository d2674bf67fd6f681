"""Deployment memory, side by side: the adapter runtime against a white-box open_clip deployment.

Every figure comes from a fresh process (``python -m craft_adapter.reference.footprint WORKER ...``), which reads its
own resident memory from ``/proc/self/status``: after importing its framework (onnxruntime and the runtime;
or torch with open_clip), after warming the framework up on a trivial model (a 2-class refiner session; a
2x2 ``nn.Linear``), and after loading its model and making one prediction.

- "Model" is the growth from the warm framework to the end: what the model or adapter itself costs.
- "Model, cold" is the growth from the bare import; it adds the framework's one-time initialisation, which
  does not depend on the model (about 9 MB for onnxruntime's first session, mostly library code paged in).
- "Process" is the whole process's resident memory at the end.

- Adapter deployment: ``craft_adapter.serve`` with an ``.onnx`` refiner for the class count, one prediction
  from fixed vendor scores (the vendor call is remote and not measured). CPU provider.
- White-box deployment: the open_clip model loaded for inference on CPU, as a white-box fine-tune such as CoOp
  must ship it, plus cached class text features ``[c, d]``; one image prediction. Built-in architectures are
  instantiated without pretrained weights (same memory); ``reference`` is the committed reference vendor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from craft_adapter.artifact.synthetic import synthetic_adapter

if TYPE_CHECKING:  # the workers stay lean: rich and the artifact module load only where used
    from rich.table import Table


HIDDEN = 256
DEFAULT_ARCHS = ("reference", "RN50", "ViT-B-16")
DEFAULT_CLASSES = (10, 1000)


@dataclass(frozen=True)
class Measurement:
    """One deployment's memory, in bytes."""

    param_bytes: int
    framework_rss: int  # after importing the framework and warming it up, before the model
    model_rss: int  # growth from loading the model and one prediction, on the warm framework
    model_rss_cold: int  # the same growth measured from the bare import
    process_rss: int  # whole process at the end
    peak_rss: int  # whole process, high-water mark


@dataclass(frozen=True)
class FootprintRow:
    """Adapter against white-box for one architecture and class count."""

    arch: str
    n_classes: int
    adapter: Measurement
    white_box: Measurement

    def ratios(self) -> dict[str, float]:
        """White-box over adapter, per figure (e.g. 292.0 means the adapter is 1/292 of the white-box)."""
        a, w = self.adapter, self.white_box
        return {k: getattr(w, k) / max(getattr(a, k), 1)
                for k in ("param_bytes", "model_rss", "model_rss_cold", "process_rss")}




def resident_bytes() -> tuple[int, int]:
    """This process's resident memory now and at its peak (``VmRSS``, ``VmHWM``), in bytes; Linux only."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _adapter_worker(onnx_path: str, n_classes: int, warmup_path: str) -> dict[str, Any]:
    scores = np.full((1, n_classes), 1.0 / n_classes, np.float32)  # what the vendor would have answered
    from PIL import Image

    from craft_adapter.serve import CallableVendor, load_runtime

    imported, _ = resident_bytes()
    warm = np.full((1, 2), 0.5, np.float32)
    load_runtime(warmup_path, CallableVendor(lambda images, prompts: warm), device="cpu").predict_scores(warm)
    framework, _ = resident_bytes()
    runtime = load_runtime(onnx_path, CallableVendor(lambda images, prompts: scores), device="cpu")
    runtime.predict_one(Image.new("RGB", (224, 224)))
    now, peak = resident_bytes()
    return {"framework_rss": framework, "model_rss": now - framework, "model_rss_cold": now - imported,
            "process_rss": now, "peak_rss": peak, "torch_imported": "torch" in sys.modules}


def _white_box_worker(model_name: str, n_classes: int) -> dict[str, Any]:
    import open_clip
    import torch

    imported, _ = resident_bytes()
    with torch.no_grad():
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))
    framework, _ = resident_bytes()
    model = open_clip.create_model(model_name, pretrained=None, device="cpu").eval()
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(torch.rand(1, 3, *size)), dim=-1)  # [1, d]
        class_features = torch.nn.functional.normalize(torch.randn(n_classes, image.shape[-1]), dim=-1)  # [c, d]
        (model.logit_scale.exp() * image @ class_features.T).softmax(-1)
    now, peak = resident_bytes()
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"param_bytes": params, "framework_rss": framework, "model_rss": now - framework,
            "model_rss_cold": now - imported, "process_rss": now, "peak_rss": peak}


def _run_worker(*args: str, timeout: float = 900) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "craft_adapter.reference.footprint", *args], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"footprint worker {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve_arch(arch: str) -> str:
    """The open_clip model name for ``arch``: ``reference`` is the committed reference vendor."""
    if arch == "reference":
        from craft_adapter.reference.task import REFERENCE_VENDOR_DIR

        return f"local-dir:{REFERENCE_VENDOR_DIR}"
    return arch


def measure_adapter(n_classes: int, workdir: Path) -> Measurement:
    """The adapter runtime's memory with an ``n_classes`` refiner, measured in a fresh process."""
    from craft_adapter.artifact.onnx_graph import build_refiner_onnx

    adapter = synthetic_adapter(n_classes)
    path, warmup = workdir / f"refiner_{n_classes}.onnx", workdir / "warmup.onnx"
    path.write_bytes(build_refiner_onnx(adapter))
    warmup.write_bytes(build_refiner_onnx(synthetic_adapter(2)))
    got = _run_worker("adapter", str(path), str(n_classes), str(warmup))
    if got.pop("torch_imported"):
        raise RuntimeError("the adapter runtime imported torch; the measurement would be meaningless")
    return Measurement(param_bytes=sum(v.nbytes for v in adapter.refiner.values()), **got)


def measure_white_box(arch: str, n_classes: int) -> Measurement:
    """A white-box open_clip deployment's memory, measured in a fresh process."""
    return Measurement(**_run_worker("white-box", resolve_arch(arch), str(n_classes)))


def run_footprint(archs: tuple[str, ...] = DEFAULT_ARCHS,
                  classes: tuple[int, ...] = DEFAULT_CLASSES) -> list[FootprintRow]:
    """Measure every architecture at every class count; the adapter side once per class count."""
    with tempfile.TemporaryDirectory(prefix="craft_footprint_") as tmp:
        adapters = {c: measure_adapter(c, Path(tmp)) for c in classes}
    return [FootprintRow(arch, c, adapters[c], measure_white_box(arch, c)) for arch in archs for c in classes]


def footprint_json(rows: list[FootprintRow]) -> dict[str, Any]:
    """Rows and ratios as JSON-ready data."""
    return {"method": __doc__.strip(), "paper_claim": "about 1/80 of the white-box deployment memory",
            "rows": [{**asdict(r), "ratios_white_box_over_adapter": r.ratios()} for r in rows]}


def _size(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KB"
    if n < 2**30:
        return f"{n / 2**20:,.1f} MB" if n < 100 * 2**20 else f"{n / 2**20:,.0f} MB"
    return f"{n / 2**30:,.2f} GB"


def arch_label(arch: str) -> str:
    """A short name for a table: a ``local-dir:`` model by its folder name, a built-in by its name."""
    return f"local-dir:{Path(arch[len('local-dir:'):]).name}" if arch.startswith("local-dir:") else arch


def footprint_table(rows: list[FootprintRow]) -> Table:
    """A rich table: adapter, white-box and their ratio (as 1/x) for each figure."""
    from rich.table import Table

    table = Table(title="Deployment memory (each figure from a fresh process)")
    for col in ("arch", "classes", "deployment", "params", "model", "model cold", "process"):
        table.add_column(col, justify="left" if col in ("arch", "deployment") else "right", no_wrap=True)
    for r in rows:
        q = r.ratios()
        for m, name in ((r.adapter, "adapter"), (r.white_box, "white-box")):
            first = name == "adapter"
            table.add_row(arch_label(r.arch) if first else "", str(r.n_classes) if first else "", name,
                          _size(m.param_bytes), _size(m.model_rss), _size(m.model_rss_cold), _size(m.process_rss))
        table.add_row("", "", "[bold]ratio[/]", f"1/{q['param_bytes']:,.0f}", f"1/{q['model_rss']:,.0f}",
                      f"1/{q['model_rss_cold']:,.0f}", f"1/{q['process_rss']:,.1f}", end_section=True)
    return table


# worker: python -m craft_adapter.reference.footprint {adapter ONNX C WARMUP | white-box MODEL C}
if __name__ == "__main__":
    kind, target, count, *rest = sys.argv[1:]
    worker = _adapter_worker if kind == "adapter" else _white_box_worker
    print(json.dumps(worker(target, int(count), *rest)))
