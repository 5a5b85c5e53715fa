"""The lean GETs' pure parts: SigV4 signing, endpoints and request paths, response heads."""

from __future__ import annotations

import datetime
from urllib.parse import quote

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcstage.store.lean_client import Endpoint, parse_head
from hpcstage.store.sigv4 import EMPTY_SHA256, SigV4


def test_signature_matches_the_aws_documentation_example() -> None:
    # "Example: GET Object" of the S3 SigV4 documentation (header-based auth, single chunk).
    signer = SigV4(
        "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "", "us-east-1"
    )
    auth = signer.authorization(
        "GET",
        "examplebucket.s3.amazonaws.com",
        "/test.txt",
        "",
        {
            "range": "bytes=0-9",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
    )
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


keys = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
).filter(lambda k: not any(p in (".", "..") for p in k.split("/")))


@settings(max_examples=150, deadline=None)
@given(key=keys, token=st.sampled_from(["", "FwoGZXIvYXdzEJr//token+/="]))
def test_signature_equals_botocores_for_any_key(key: str, token: str) -> None:
    when = datetime.datetime(2026, 11, 29, 6, 30, 15)
    endpoint = Endpoint.for_bucket("http://127.0.0.1:9000", "datasets", "path")
    path = endpoint.path(key)
    assert path is not None
    signer = SigV4("AKIDEXAMPLE", "secret/with+chars", token, "eu-west-2")
    headers = {"x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": when.strftime("%Y%m%dT%H%M%SZ")}
    if token:
        headers["x-amz-security-token"] = token
    ours = signer.authorization("GET", endpoint.host_header, path, "", headers)

    request = AWSRequest(method="GET", url=f"http://127.0.0.1:9000{path}", headers={})
    theirs_signer = botocore.auth.S3SigV4Auth(
        Credentials("AKIDEXAMPLE", "secret/with+chars", token or None), "s3", "eu-west-2"
    )
    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: when
    try:
        theirs_signer.add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    assert ours == request.headers["Authorization"]


@pytest.mark.parametrize(
    ("url", "style", "expected"),
    [
        ("http://127.0.0.1:9000", "path", ("127.0.0.1", 9000, False, "127.0.0.1:9000", "/b")),
        ("https://s3.example.org", "path", ("s3.example.org", 443, True, "s3.example.org", "/b")),
        (
            "https://s3.example.org:443/",
            "path",
            ("s3.example.org", 443, True, "s3.example.org", "/b"),
        ),
        (
            "http://s3.example.org:8080",
            "virtual",
            ("b.s3.example.org", 8080, False, "b.s3.example.org:8080", ""),
        ),
        ("http://[::1]:9000", "path", ("::1", 9000, False, "[::1]:9000", "/b")),
    ],
)
def test_endpoints(url: str, style: str, expected: tuple[object, ...]) -> None:
    e = Endpoint.for_bucket(url, "b", style)
    assert (e.connect_host, e.port, e.tls, e.host_header, e.path_prefix) == expected


@pytest.mark.parametrize(
    ("url", "style"),
    [
        ("ftp://x", "path"),
        ("http://user@x", "path"),
        ("http://x/prefix", "path"),
        ("http://x", "auto"),
    ],
)
def test_endpoints_left_to_the_sdk(url: str, style: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported|has a path|left to the SDK"):
        Endpoint.for_bucket(url, "b", style)


def test_paths_are_percent_encoded_and_dot_segments_left_to_the_sdk() -> None:
    e = Endpoint.for_bucket("http://h:1", "datasets", "path")
    assert e.path("a b/ü+%?#~x") == "/datasets/" + quote("a b/ü+%?#~x", safe="/~")
    assert e.path("a b/ü+%?#~x") == "/datasets/a%20b/%C3%BC%2B%25%3F%23~x"
    assert e.path("a/../b") is None
    assert e.path("./b") is None
    assert e.path("a/..b") == "/datasets/a/..b"


def test_parse_head() -> None:
    status, headers = parse_head(
        b'HTTP/1.1 200 OK\r\nContent-Length: 4\r\nETag:  "abc" \r\nX-Odd: a:b\r\n\r\n'
    )
    assert status == 200
    assert headers == {"content-length": "4", "etag": '"abc"', "x-odd": "a:b"}


@pytest.mark.parametrize(
    "head",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"],
)
def test_parse_head_refuses_what_is_not_http(head: bytes) -> None:
    with pytest.raises(ValueError, match=r"not an HTTP|malformed"):
        parse_head(head)
