"""onnxruntime sessions for a tiny model: CUDA only where it really loads, one thread, no spinning.

onnxruntime-gpu logs an error when asked for CUDA on a machine without a GPU or without the CUDA libraries.
So CUDA is tried only when onnxruntime was built with it and a driver reports a device, and that first try
runs with onnxruntime's logger silenced. Whether it worked is remembered for the process.

The CPU build (``onnxruntime``) and the GPU build (``onnxruntime-gpu``) are two distributions that write the same
``onnxruntime/`` folder: with both installed, whichever came last wins, and uninstalling either breaks the other.
pip cannot express "instead of", so the first session of a process checks the installed distributions and warns
with the fix (:class:`OnnxruntimeConflictWarning`); the library never prints.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import warnings
from collections.abc import Iterator
from importlib import metadata

import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_DEFAULT_SEVERITY = 2  # warning, onnxruntime's own default
_QUIET = 4  # fatal only
_cuda_works: bool | None = None  # None: not tried yet in this process
_install_checked = False
# distributions that each install the onnxruntime package; more than one in a process's environment is a conflict
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                      "onnxruntime-qnn")


class OnnxruntimeConflictWarning(RuntimeWarning):
    """More than one onnxruntime build is installed; they overwrite each other's files."""


def onnxruntime_builds() -> list[str]:
    """The onnxruntime distributions installed here, as ``name==version``."""
    found = []
    for name in ONNXRUNTIME_BUILDS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name}=={metadata.version(name)}")
    return found


def onnxruntime_conflict() -> str | None:
    """A message naming the fix if more than one onnxruntime build is installed, else None."""
    builds = onnxruntime_builds()
    if len(builds) < 2:
        return None
    names = " ".join(b.split("==")[0] for b in builds)
    return (f"{' and '.join(builds)} are installed together; they write the same onnxruntime/ folder, so the last one "
            "installed wins and uninstalling either breaks the other. Keep exactly one: "
            f"pip uninstall -y {names} && pip install onnxruntime-gpu (GPU) or pip install onnxruntime (CPU only)")


def check_onnxruntime_install() -> None:
    """Warn once per process (:class:`OnnxruntimeConflictWarning`) if two onnxruntime builds are installed."""
    global _install_checked
    if _install_checked:
        return
    _install_checked = True
    message = onnxruntime_conflict()
    if message is not None:
        warnings.warn(message, OnnxruntimeConflictWarning, stacklevel=3)


def _cuda_device_present() -> bool:
    """Whether a CUDA driver is installed and reports at least one device; never raises, never prints."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (OSError, AttributeError):
        return False


def cuda_candidate() -> bool:
    """Whether CUDA is worth trying: onnxruntime has the provider, a GPU is there, no earlier try failed."""
    if _cuda_works is not None:
        return _cuda_works
    return CUDA in ort.get_available_providers() and _cuda_device_present()


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    ort.set_default_logger_severity(_QUIET)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def session_options() -> ort.SessionOptions:
    """Options for a tiny model: one intra-op and one inter-op thread, no spin-waiting, quiet logs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return opts


def _try_cuda(model: bytes | str) -> ort.InferenceSession | None:
    global _cuda_works
    session = None
    with _quiet_onnxruntime():
        # pip's onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels only after preloading them;
        # if torch was imported first, it already loaded its own copies.
        if hasattr(ort, "preload_dlls") and "torch" not in sys.modules:
            with contextlib.suppress(Exception):
                ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
        with contextlib.suppress(Exception):  # any failure here means CUDA does not really load
            session = ort.InferenceSession(model, session_options(), providers=[CUDA, CPU])
    _cuda_works = session is not None and CUDA in session.get_providers()
    return session if _cuda_works else None


def make_session(model: bytes | str, device: str = "auto") -> ort.InferenceSession:
    """A session for ONNX ``model`` (bytes or a path): ``auto`` (CUDA if it really loads), ``cpu`` or ``cuda``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    check_onnxruntime_install()
    if device != "cpu" and cuda_candidate():
        session = _try_cuda(model)
        if session is not None:
            return session
    if device == "cuda":
        raise RuntimeError("device='cuda' was asked for, but onnxruntime cannot run CUDA here (no GPU, or "
                           "onnxruntime-gpu without the CUDA/cuDNN libraries it was built for); use device='cpu' "
                           "or install those libraries")
    return ort.InferenceSession(model, session_options(), providers=[CPU])
