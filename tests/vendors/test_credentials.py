"""Vendor URLs and keys: one URL check for fit and the server, one way to scrub a key out of text."""

from __future__ import annotations

import pytest

from craft_adapter.vendors.credentials import Secret, auth_headers, check_vendor_url, header_secrets, scrub_secrets


@pytest.mark.parametrize("url", ["http://127.0.0.1:8091", "https://api.example/v1/zs?model=x", "http://h/"])
def test_good_vendor_urls_pass(url: str) -> None:
    check_vendor_url(url)


@pytest.mark.parametrize("url, message", [
    ("ftp://h/", r"vendor URL must be http\(s\)://host\[:port\]/path, got 'ftp://h/'"),
    ("http:///path", "vendor URL must be http"),
    ("127.0.0.1:8091", "vendor URL must be http"),
    ("https://user:hunter2@h/", "not in the vendor URL"),
    ("https://:hunter2@h/", "not in the vendor URL"),
])
def test_bad_vendor_urls_are_refused_without_showing_the_key(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        check_vendor_url(url)
    assert "hunter2" not in str(e.value)


def test_one_scrubbing_path_for_secrets_and_header_values() -> None:
    key = Secret("sk-12345")
    assert key.scrub("a sk-12345 b") == "a *** b" and Secret("").scrub("text") == "text"
    headers = auth_headers(key, "X-Api-Key", "Token")
    assert headers == {"X-Api-Key": "Token sk-12345"} and auth_headers(None) == {}
    secrets = header_secrets([*headers.items(), ("Content-Type", "application/json")])
    assert secrets == ["sk-12345"]  # the token after the scheme; Content-Type is not a secret
    assert scrub_secrets("echo: Token sk-12345 / sk-12345", secrets) == "echo: Token *** / ***"
    assert header_secrets([("X-Api-Key", "bare-key-1"), ("X-B", "abc")]) == ["bare-key-1"]  # too short to matter
    assert scrub_secrets("text", ["", "x" * 0]) == "text"
