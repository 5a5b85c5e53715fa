"""Vendor errors (botocore, aiohttp) of an S3 request turned into hpcstage's error tree, and
messages safe to print."""

from __future__ import annotations

import re
from typing import Final

import aiohttp
import botocore.exceptions as bce
from botocore.parsers import ResponseParserError

from hpcstage.errors import (
    CredentialError,
    ObjectChangedError,
    ObjectMissingError,
    StoreError,
    TransientStoreError,
)

_CREDENTIAL_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "401",
        "403",
    }
)

_CONDITION_CODES: Final = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})

_MISSING_CODES: Final = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})

_TRANSIENT_CODES: Final = frozenset(
    {
        "BadDigest",  # the body was corrupted on the way: send it again
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)

_TRANSIENT_VENDOR: Final = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bce.IncompleteReadError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)

_CREDENTIAL_VENDOR: Final = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.ProfileNotFound,
    bce.TokenRetrievalError,
    bce.SSOError,
)

# Everything a request can raise that this module translates.
VENDOR_ERRORS: Final = (
    bce.BotoCoreError,
    bce.ClientError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)

# What botocore's parsers and handlers raise, untranslated, on a response that is well-formed
# XML of the wrong shape: <Size>lots</Size> (ValueError from int()), a <Contents> without <Key>
# (KeyError from the url-decoding handler). Caught around client calls only, never our code.
MALFORMED: Final = (ValueError, KeyError, TypeError, AttributeError, IndexError)

# A body that ended before its Content-Length (aiohttp) or that botocore found short.
_TRUNCATED_VENDOR: Final = (aiohttp.ClientPayloadError, bce.IncompleteReadError)

_SHOWN_MAX: Final = 300  # characters of a key or server text quoted in a message

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """``text`` safe to print in one line of a message: control characters escaped, bounded.

    Keys may hold any character; a message must not carry a newline or a terminal escape
    sequence from a hostile store (or user) to a log or a terminal.
    """
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def malformed_response(exc: BaseException, where: str) -> StoreError:
    """The error for a response botocore could not make sense of (see ``MALFORMED``)."""
    detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    return StoreError(f"{where}: the store sent a malformed response ({shown(detail)})")


def _translate_client_error(exc: bce.ClientError, where: str) -> StoreError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    if code in _CREDENTIAL_CODES or status in (401, 403):
        # The server's text is left out: some error bodies echo the request's signing details.
        return CredentialError(f"{where}: access denied ({code or status}); check the credentials")
    if code in _CONDITION_CODES or status == 412:
        # A conditional request (If-Match, If-None-Match, x-amz-copy-source-if-match) lost a
        # race: the object is not what the caller saw. Not retried as is: look again first.
        return ObjectChangedError(f"{where}: the object changed (precondition failed)")
    if code in _MISSING_CODES or status == 404:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return ObjectMissingError(f"{where}: no such {what}")
    if code == str(status) and status >= 500:
        # No S3 error in the body: a proxy's page, or (botocore turns these into a 500) a 200
        # whose XML did not parse, e.g. a listing cut off on the way.
        message = f"{where}: HTTP {status} without an S3 answer (malformed or cut-off response)"
    else:
        message = f"{where}: {code or status} {shown(str(error.get('Message', '')))}".rstrip()
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientStoreError(message)
    return StoreError(message)


def translate_s3_error(exc: BaseException, where: str) -> StoreError:
    """Map a botocore/aiohttp exception to the hpcstage tree; ``where`` is "OP s3://bucket/key".

    Callers raise the result ``from exc``; the message never holds credentials.
    """
    if isinstance(exc, bce.ClientError):
        return _translate_client_error(exc, where)
    if isinstance(exc, bce.SSLError | aiohttp.ClientSSLError):
        # A certificate problem does not heal by waiting: say so at once.
        return StoreError(f"{where}: TLS error ({exc}); check store.verify_tls/ca_bundle")
    if isinstance(exc, _CREDENTIAL_VENDOR):
        return CredentialError(f"{where}: {exc}")
    if isinstance(exc, _TRUNCATED_VENDOR):
        return TransientStoreError(
            f"{where}: truncated: the connection ended before the whole body arrived"
        )
    if isinstance(exc, bce.ReadTimeoutError):
        return TransientStoreError(f"{where}: the store stopped answering (read timeout)")
    if isinstance(exc, _TRANSIENT_VENDOR):
        return TransientStoreError(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ResponseParserError):
        return StoreError(f"{where}: the store sent a malformed response")
    return StoreError(f"{where}: {type(exc).__name__}: {exc}")


def error_code(exc: BaseException) -> str:
    """The S3 error code behind a translated (and maybe retried) error ("": none)."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, bce.ClientError):
        cause = cause.__cause__
    if isinstance(cause, bce.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""
