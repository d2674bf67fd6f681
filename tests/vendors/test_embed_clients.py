"""The embedding API clients against loopback servers that follow each published shape, backed by a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
from craft_adapter.vendors.cohere_embed import CohereEmbedVendor
from craft_adapter.vendors.embedding_requests import indexed_rows, vendor_message
from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.openai_embeddings import OpenAIEmbeddingsVendor
from craft_adapter.vendors.protocols import EmbeddingBackend
from craft_adapter.vendors.registry import make_vendor
from craft_adapter.vendors.voyage_embed import VoyageEmbedVendor

PROTOCOLS = ("openai-embeddings", "cohere", "voyage")
KEY = "sk-embed-secret-0123"
TEXTS = ["a photo of a coat.", "a photo of a bag.", "a photo of a sandal."]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embeddings_match_the_model_and_every_chunk_is_one_counted_call(backend, protocol):
    images = random_images(11, seed=3)
    with FakeEmbeddingServer(protocol, backend, key=KEY) as server:
        vendor = make_vendor(protocol, server.url, key=KEY, max_images=4, max_texts=2)
        assert isinstance(vendor, EmbeddingBackend) and KEY not in json.dumps(vendor.identity)
        img, txt = vendor.embed_images(images), vendor.embed_texts(TEXTS)
        assert img.dtype == np.float32 and img.shape == (11, backend.embed_images(images[:1]).shape[1])
        np.testing.assert_allclose(img, backend.embed_images(images), atol=1e-6)
        np.testing.assert_allclose(txt, backend.embed_texts(TEXTS), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
        want = vendor.calls_for(11, "image") + vendor.calls_for(3, "text")
        assert (vendor.calls_for(11, "image"), vendor.calls_for(3, "text")) == (3, 2)
        assert vendor.calls == want == server.requests == server.served


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_key_is_a_permanent_401_without_the_key(backend, protocol):
    with FakeEmbeddingServer(protocol, backend, key=KEY) as server:
        vendor = make_vendor(protocol, server.url, key=KEY + "-wrong")
        with pytest.raises(VendorError) as e:
            vendor.embed_texts(TEXTS)
    assert e.value.status == 401 and not e.value.transient and KEY not in str(e.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("status", [429, 503])
def test_rate_limits_and_outages_are_transient_with_the_vendor_hint(backend, protocol, status):
    with FakeEmbeddingServer(protocol, backend, key=KEY) as server:
        server.faults.append(status)
        vendor = make_vendor(protocol, server.url, key=KEY)
        with pytest.raises(VendorError) as e:
            vendor.embed_texts(TEXTS)
        assert e.value.status == status and e.value.transient
        assert (e.value.retry_after == 0.0) == (status == 429)
        assert vendor.embed_texts(TEXTS).shape[0] == 3  # the next call goes through
        assert vendor.calls == server.requests == 2


def test_infinity_caps_images_at_32_with_a_fastapi_422(backend):
    with FakeEmbeddingServer("openai-embeddings", backend) as server:
        too_many = OpenAIEmbeddingsVendor(server.url, max_images=33)
        with pytest.raises(VendorError) as e:
            too_many.embed_images(random_images(33))
        assert e.value.status == 422 and not e.value.transient and "at most 32 items" in str(e.value)
        default = OpenAIEmbeddingsVendor(server.url)
        assert default.embed_images(random_images(33)).shape[0] == 33 and default.calls == 2
        b64 = OpenAIEmbeddingsVendor(server.url, encoding_format="base64")
        np.testing.assert_array_equal(b64.embed_texts(TEXTS), default.embed_texts(TEXTS))


def test_cohere_v3_takes_one_image_a_call_and_96_texts(backend):
    with FakeEmbeddingServer("cohere", backend, key=KEY) as server:
        v3 = CohereEmbedVendor(server.url, key=KEY, model="embed-english-v3.0")
        assert v3.calls_for(5, "image") == 5 and v3.calls_for(200, "text") == 3
        assert v3.embed_images(random_images(3)).shape[0] == 3 and server.requests == 3
        forced = CohereEmbedVendor(server.url, key=KEY, model="embed-english-v3.0", max_images=2)
        with pytest.raises(VendorError) as e:
            forced.embed_images(random_images(2))
        assert e.value.status == 400 and "one image" in str(e.value)
        with pytest.raises(VendorError) as e:
            CohereEmbedVendor(server.url, key=KEY, max_texts=97).embed_texts(["x"] * 97)
        assert e.value.status == 400 and "at most 96" in str(e.value)


def test_voyage_batch_limit_is_a_400_with_its_detail(backend):
    with FakeEmbeddingServer("voyage", backend, key=KEY, max_batch=4) as server:
        with pytest.raises(VendorError) as e:
            VoyageEmbedVendor(server.url, key=KEY, max_texts=5).embed_texts(["x"] * 5)
        assert e.value.status == 400 and "batch size limit is 4" in str(e.value)
        assert VoyageEmbedVendor(server.url, key=KEY, max_texts=4).embed_texts(["x"] * 5).shape[0] == 5


def test_unreachable_vendor_is_transient_and_replies_are_checked():
    with pytest.raises(VendorError) as e:
        OpenAIEmbeddingsVendor("http://127.0.0.1:9", key=KEY, timeout=2).embed_texts(TEXTS)
    assert e.value.transient and e.value.status is None and KEY not in str(e.value)
    with pytest.raises(ValueError):
        indexed_rows([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}], 2)
    with pytest.raises(ValueError):
        indexed_rows([{"index": -1, "embedding": [1.0]}], 1)
    assert vendor_message(b'{"detail": [{"loc": ["body", "input"], "msg": "too long"}]}') == "body.input: too long"
    assert vendor_message(b'{"message": "invalid api token", "id": "x"}') == "invalid api token"
    assert vendor_message(b'{"error": {"message": "overloaded"}}') == "overloaded"
