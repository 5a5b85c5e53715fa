"""AWS Signature Version 4, as the lean GETs sign their requests (botocore signs the rest).

Checked against botocore's signer and AWS's published example in tests/unit/test_lean_client.py.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


class SigV4:
    """AWS Signature Version 4 for the ``Authorization`` header (S3: payload hash as given)."""

    def __init__(
        self, access_key: str, secret_key: str, token: str, region: str, service: str = "s3"
    ) -> None:
        self.access_key = access_key
        self.token = token
        self._secret = secret_key
        self.region = region
        self.service = service
        self._keys: dict[str, bytes] = {}

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = f"AWS4{self._secret}".encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}  # one day's key at a time
        return key

    def authorization(
        self, method: str, host: str, path: str, query: str, headers: Mapping[str, str]
    ) -> str:
        """The header value for a request with ``headers`` (lowercase names, all signed).

        ``headers`` must hold ``x-amz-date`` and ``x-amz-content-sha256``; ``path`` is the
        request path exactly as sent (already percent-encoded), ``query`` its canonical query.
        """
        signed = {"host": host, **headers}
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names),
                ";".join(names),
                headers["x-amz-content-sha256"],
            ]
        )
        amz_date = headers["x-amz-date"]
        scope = f"{amz_date[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(amz_date[:8]), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        return (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )


def amz_now() -> str:
    """The current time as SigV4 wants it (``20240102T030405Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
