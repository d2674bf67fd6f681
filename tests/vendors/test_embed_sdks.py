"""Each loopback server driven by the vendor's official SDK (base URL pointed at it): the shapes are the real ones.

Skipped where the SDK is not installed (``openai``, ``cohere``, ``voyageai``: dev-only interop checks).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_images

from craft_adapter.testing.fake_embedding_servers import FakeEmbeddingServer
from craft_adapter.vendors.embedding_requests import data_uri
from craft_adapter.vendors.registry import make_vendor

KEY = "sdk-key-0123"


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

    return OpenClipBackend(f"local-dir:{tiny_model_dir}", device="cpu")


def test_openai_client_reads_the_infinity_shape(backend):
    openai = pytest.importorskip("openai")
    images = random_images(5, seed=1)
    with FakeEmbeddingServer("openai-embeddings", backend, key=KEY) as server:
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        # no encoding_format: the client asks for base64 and decodes little-endian float32 itself
        reply = client.embeddings.create(model="clip", input=[data_uri(im) for im in images],
                                         extra_body={"modality": "image"})
        ours = make_vendor("openai-embeddings", server.url, key=KEY, model="clip")
        np.testing.assert_allclose(np.array([d.embedding for d in reply.data], np.float32),
                                   ours.embed_images(images), atol=1e-6)  # ours re-normalises
        texts = client.embeddings.create(model="clip", input=["a coat"], encoding_format="float",
                                         extra_body={"modality": "text"})
        np.testing.assert_allclose(texts.data[0].embedding, backend.embed_texts(["a coat"])[0], atol=1e-6)
        with pytest.raises(openai.UnprocessableEntityError):
            client.embeddings.create(model="clip", input=[data_uri(images[0])] * 33, extra_body={"modality": "image"})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).embeddings.create(
                model="clip", input=["x"], extra_body={"modality": "text"})
        assert server.requests == 5 and server.served == 3


def test_cohere_sdk_reads_the_embed_v2_shape(backend):
    cohere = pytest.importorskip("cohere")
    images = random_images(3, seed=2)
    with FakeEmbeddingServer("cohere", backend, key=KEY) as server:
        co = cohere.ClientV2(api_key=KEY, base_url=server.url)
        reply = co.embed(model="embed-v4.0", input_type="image", images=[data_uri(im) for im in images],
                         embedding_types=["float"])
        ours = make_vendor("cohere", server.url, key=KEY)
        np.testing.assert_allclose(np.array(reply.embeddings.float_, np.float32), ours.embed_images(images),
                                   atol=1e-6)
        with pytest.raises(cohere.BadRequestError) as e:
            co.embed(model="embed-v4.0", input_type="search_query", texts=["x"] * 97, embedding_types=["float"])
        assert "at most 96" in e.value.body["message"]
        with pytest.raises(cohere.UnauthorizedError):
            cohere.ClientV2(api_key="wrong", base_url=server.url).embed(
                model="embed-v4.0", input_type="search_query", texts=["x"], embedding_types=["float"])


def test_voyage_sdk_reads_the_multimodal_shape(backend):
    voyageai = pytest.importorskip("voyageai")
    images = random_images(3, seed=4)
    with FakeEmbeddingServer("voyage", backend, key=KEY) as server:
        vo = voyageai.Client(api_key=KEY, base_url=server.url, max_retries=0)
        # the SDK sends encoding_format=base64 and re-encodes PIL images as lossless WEBP data URIs
        reply = vo.multimodal_embed(inputs=[[im] for im in images], model="voyage-multimodal-3.5")
        ours = make_vendor("voyage", server.url, key=KEY)
        np.testing.assert_allclose(np.array(reply.embeddings, np.float32), ours.embed_images(images), atol=1e-6)
        assert reply.image_pixels == 3 * 28 * 28
        with pytest.raises(voyageai.error.AuthenticationError):
            voyageai.Client(api_key="wrong", base_url=server.url, max_retries=0).multimodal_embed(
                inputs=[["x"]], model="voyage-multimodal-3.5")
