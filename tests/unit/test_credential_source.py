"""The site's S3 credentials stay fresh (issue 15 item 11): botocore's chain, asked again.

A real ``credential_process`` profile stands in for STS/SSO/instance roles: it prints the key
written in a file, with an expiry 12 minutes away (inside botocore's 15-minute refresh
window, outside its 10-minute mandatory one), so each question runs it again. Before,
credentials were resolved once at start-up and every staging failed once they lapsed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hpcstage.errors import CredentialError
from hpcstage.store.credentials import CredentialSource

SCRIPT = """import datetime, json, pathlib, sys
key = pathlib.Path(sys.argv[1]).read_text().split()
soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)
print(json.dumps({"Version": 1, "AccessKeyId": key[0], "SecretAccessKey": key[1],
                  "SessionToken": "t-" + key[0], "Expiration": soon.isoformat()}))
"""


@pytest.fixture
def rotating(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A profile 'rotating' whose credential_process reports the key in the returned file."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    script, key = tmp_path / "creds.py", tmp_path / "key"
    script.write_text(SCRIPT)
    key.write_text("AKIAFIRST secret-1\n")
    (tmp_path / "config").write_text(
        f"[profile rotating]\ncredential_process = {sys.executable} {script} {key}\n"
        "region = eu-west-3\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return key


def test_temporary_credentials_are_fetched_again_before_they_expire(rotating: Path) -> None:
    source = CredentialSource("rotating")
    first = source.current()
    assert first == {"access_key": "AKIAFIRST", "secret_key": "secret-1", "token": "t-AKIAFIRST"}
    rotating.write_text("AKIASECOND secret-2\n")  # the provider hands out new keys
    assert source.current()["access_key"] == "AKIASECOND"


def test_a_failing_refresh_keeps_the_keys_that_are_still_valid(rotating: Path) -> None:
    source = CredentialSource("rotating")
    source.current()
    rotating.write_text("")  # the provider fails for a while: 12 minutes of the old keys left
    assert source.current()["access_key"] == "AKIAFIRST"
    rotating.write_text("AKIATHIRD secret-3\n")
    assert source.current()["access_key"] == "AKIATHIRD"


def test_no_credentials_at_all_is_a_credential_error(rotating: Path) -> None:
    with pytest.raises(CredentialError, match=r"S3 credentials: .*nope"):
        CredentialSource("nope").current()


def test_the_region_comes_from_the_config_then_aws_region_then_the_profile(
    rotating: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = CredentialSource("rotating")
    assert source.region("us-west-2") == "us-west-2"
    assert source.region("") == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert source.region("") == "ap-south-1"
    monkeypatch.delenv("AWS_REGION")
    assert CredentialSource(None).region("") == "us-east-1"
