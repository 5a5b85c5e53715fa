"""Authorization decisions (pure)."""

from __future__ import annotations

import pytest

from hpcstage.config.schema import PolicyRule, PolicySettings
from hpcstage.core.policy import check, covers

RULES = PolicySettings(
    default="deny",
    rules=[
        PolicyRule(
            accounts=["chem"],
            read=["s3://datasets/chem/", "/shared/chem"],
            write=["s3://results/chem/"],
        ),
        PolicyRule(users=["carol"], read=["s3://datasets/"]),
    ],
)


@pytest.mark.parametrize(
    ("user", "account", "access", "url", "allowed"),
    [
        ("alice", "chem", "read", "s3://datasets/chem/ligands/", True),
        ("alice", "chem", "read", "s3://datasets/chem/a.pdb", True),
        ("alice", "chem", "read", "s3://datasets/chemistry/x", False),  # not a string prefix
        ("alice", "chem", "read", "s3://datasets/bio/x", False),
        ("alice", "chem", "write", "s3://datasets/chem/x", False),  # read is not write
        ("alice", "chem", "write", "s3://results/chem/1/", True),
        ("bob", "bio", "read", "s3://datasets/chem/ligands/", False),
        ("bob", "", "read", "s3://datasets/chem/", False),
        ("carol", "", "read", "s3://datasets/bio/x", True),  # a rule by user name
        ("alice", "chem", "read", "/shared/chem/set1", True),
        ("alice", "chem", "read", "/shared/chem", True),
        ("alice", "chem", "read", "/shared/chemistry", False),
        ("alice", "chem", "read", "/shared/chem/../bio", False),  # normalised before matching
    ],
)
def test_decisions(user: str, account: str, access: str, url: str, allowed: bool) -> None:
    decision = check(RULES, user, account, access, url)  # type: ignore[arg-type]
    assert decision.allowed is allowed, decision


def test_refusal_names_who_what_and_where() -> None:
    decision = check(RULES, "bob", "bio", "read", "s3://datasets/chem/x")
    assert decision.rule == (
        "no policy rule grants user bob (account bio) read access to s3://datasets/chem/x"
    )


def test_grant_names_the_rule() -> None:
    assert check(RULES, "alice", "chem", "read", "s3://datasets/chem/x").rule == (
        "policy.rules[1] grants read on s3://datasets/chem/"
    )


def test_default_allow_lets_everything_through() -> None:
    assert check(PolicySettings(default="allow"), "x", "", "write", "s3://any/k").allowed


def test_relative_paths_are_never_covered() -> None:
    assert not covers("/shared/chem", "shared/chem/x")
