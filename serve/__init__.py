"""The deployable runtime: a shipped adapter in front of a vendor. Needs numpy, safetensors, onnxruntime, PIL.

Never imports torch, open_clip or training code. Five lines wrap a vendor we have never heard of::

    from craft_adapter.serve import CallableVendor, load_runtime

    def my_vendor(images, prompts):  # -> scores [len(images), len(prompts)]
        return [my_api.classify(im, prompts) for im in images]

    runtime = load_runtime("adapter.onnx", CallableVendor(my_vendor, returns="probabilities"))
    print(runtime.predict_one(image).label)
"""

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.serve.runtime import AdapterRuntime, Prediction, Predictions, load_runtime
from craft_adapter.serve.session import make_session
from craft_adapter.serve.shipped import ShippedAdapter
from craft_adapter.serve.vendor_binding import bind_vendor
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.http_clients import EmbeddingApiVendor, HfInferenceVendor, HttpZeroShotVendor
from craft_adapter.vendors.protocols import CallableVendor
from craft_adapter.vendors.replies import check_scores

__all__ = [
    "AdapterError", "AdapterRuntime", "CallableVendor", "EmbeddingApiVendor", "HfInferenceVendor",
    "HttpZeroShotVendor", "Prediction", "Predictions", "ShippedAdapter", "VendorError", "bind_vendor",
    "check_scores", "load_runtime", "make_session",
]
