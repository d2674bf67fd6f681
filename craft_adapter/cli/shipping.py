"""Shipping commands: ``export --onnx``, ``vendor`` (a local HF-protocol vendor) and ``footprint``.

``cli.py`` calls :func:`register` on its app. Heavy imports (torch, open_clip) happen inside the commands.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated

import typer

from craft_adapter.cli.shared import DEFAULT_MODEL, DeviceOpt, ModelOpt, WeightsOpt, err, fail, load_backend, out

AdapterArg = Annotated[Path, typer.Argument(help="The fitted adapter, a .safetensors file.")]
OnnxOpt = Annotated[bool, typer.Option("--onnx", help="Write the refiner as ONNX (the one format so far).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output path. Default: ADAPTER with .onnx.")]


def export_cmd(
    adapter: AdapterArg,
    onnx: OnnxOpt = False,
    output: OutOpt = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 or newer.")] = 18,
    atol: Annotated[float, typer.Option(help="Parity limit: max abs difference from the torch refiner.")] = 1e-5,
) -> None:
    """Export the adapter's refiner to ONNX, after checking parity with torch through onnxruntime."""
    from craft_adapter.artifact.adapter_file import Adapter, AdapterError
    from craft_adapter.export import ExportError, export_onnx

    if not onnx:
        raise fail("say which format to export: --onnx")
    if output is not None and output.resolve() == adapter.resolve():
        raise fail("the output path is the adapter itself; choose another --out")
    try:
        loaded = Adapter.load(adapter)
        report = export_onnx(adapter, output, opset=opset, atol=atol)
    except (AdapterError, ExportError) as e:
        raise fail(str(e)) from None
    if loaded.mode == "soft":  # the file is right, but alone it cannot send this adapter's prompt
        n_ctx, width = loaded.ctx.shape
        err.print(f"[yellow]warning:[/] this is a soft-prompt adapter: its {n_ctx} context vectors (x {width}, "
                  f"prompt.ctx) do not travel in {report.path}, which holds the refiner only. The runtime refuses "
                  "the .onnx for it. Ship the .safetensors file to a vendor that accepts context vectors (the "
                  "in-process open_clip backend, or a plug-in protocol with embed_soft); for a string API "
                  "(hf-zero-shot, openai-embeddings, cohere, voyage), refit with --prompt text", highlight=False)
    parity = ", ".join(f"batch {b}: {d:.2g}" for b, d in report.max_abs_diff_torch.items())
    out.print(f"wrote [bold]{report.path}[/] (opset {report.opset}, {report.n_classes} classes, hidden "
                  f"{report.hidden}); max abs difference from torch: {parity} (limit {atol:g})", highlight=False)


def vendor_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    host: Annotated[str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless you mean to expose it.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8080,
    verbose: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve an open_clip model as a local vendor: Hugging Face zero-shot protocol and embeddings."""
    from craft_adapter.reference.local_vendor import make_vendor_server

    backend = load_backend(model, weights, device)
    try:
        server = make_vendor_server(backend, host, port, verbose)
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port} ({e}); choose another --port (0 picks a free one)") from None
    if not _is_loopback(host):
        err.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach it can use this model")
    typer.echo(f"serving {backend.identity.get('model')} at {server.url}", err=False)
    typer.echo(f"  zero-shot (Hugging Face protocol): POST {server.url}/   embeddings: POST {server.url}"
               "/embed/images, /embed/texts   info: GET /info   (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def footprint_cmd(
    arch: Annotated[list[str] | None, typer.Option(
        "--arch", help="reference, an open_clip architecture (random init) or local-dir:PATH; repeatable. "
        "Default: reference, RN50, ViT-B-16.")] = None,
    classes: Annotated[list[int] | None, typer.Option(
        "--classes", help="Class count; repeatable. Default: 10 and 1000.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")] = None,
) -> None:
    """Deployment memory of the adapter runtime against a white-box open_clip deployment, side by side."""
    from craft_adapter.reference.footprint import (
        DEFAULT_ARCHS,
        DEFAULT_CLASSES,
        footprint_json,
        footprint_table,
        run_footprint,
    )

    archs, counts = tuple(arch or DEFAULT_ARCHS), tuple(classes or DEFAULT_CLASSES)
    if any(c < 2 for c in counts):
        raise fail("--classes must be at least 2")
    try:
        with err.status(f"measuring {len(archs) * len(counts) + len(counts)} deployments, each in a fresh process"):
            rows = run_footprint(archs, counts)
    except RuntimeError as e:
        raise fail(str(e)) from None
    out.print(footprint_table(rows))
    for r in rows:
        q = r.ratios()
        out.print(f"{r.arch} at {r.n_classes} classes: the adapter is 1/{q['param_bytes']:,.0f} of the "
                  f"white-box parameters, 1/{q['model_rss']:,.0f} of its model memory (1/{q['model_rss_cold']:,.0f} "
                  f"counting onnxruntime's first-session start-up) and 1/{q['process_rss']:,.1f} of its whole "
                  "process (paper: about 1/80)", highlight=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(footprint_json(rows), indent=2) + "\n")


def register(app: typer.Typer) -> None:
    """Add ``export``, ``vendor`` and ``footprint`` to ``app``."""
    app.command("export")(export_cmd)
    app.command("vendor")(vendor_cmd)
    app.command("footprint")(footprint_cmd)
