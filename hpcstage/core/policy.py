"""Authorization: may this user (in this Slurm account) read or write this location? Pure.

The daemon holds the site's store credentials, so it must never stage for a user what the
user may not read, nor write where the user may not write. Rules come from ``[policy]``:
a rule applies when the job's account is in ``accounts`` or its user in ``users`` ("*"
matches anyone); it grants ``read``/``write`` on prefixes (``s3://bucket/prefix/``, ending
with '/') or shared-filesystem directories. The first rule granting the access wins; with
none, ``policy.default`` decides ("deny" unless the site is single-tenant).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # core reads the settings' attributes; pydantic stays out of it
    from hpcstage.config.schema import PolicyRule, PolicySettings


Access = Literal["read", "write"]


@dataclass(frozen=True)
class Decision:
    """The answer and the rule that gave it (for messages and the audit log)."""

    allowed: bool
    rule: str


def check(policy: PolicySettings, user: str, account: str, access: Access, url: str) -> Decision:
    """Whether ``user``/``account`` may ``access`` the location ``url``."""
    for index, rule in enumerate(policy.rules, start=1):
        if not _applies(rule, user, account):
            continue
        grants = rule.read if access == "read" else rule.write
        for grant in grants:
            if covers(grant, url):
                return Decision(True, f"policy.rules[{index}] grants {access} on {grant}")
    if policy.default == "allow":
        return Decision(True, "policy.default = allow")
    who = f"user {user}" + (f" (account {account})" if account else "")
    return Decision(False, f"no policy rule grants {who} {access} access to {url}")


def shared(policy: PolicySettings, user: str, account: str, url: str) -> bool:
    """True when a rule that grants reading ``url`` marks it shared with the account's group."""
    return any(
        rule.shared and _applies(rule, user, account) and any(covers(g, url) for g in rule.read)
        for rule in policy.rules
    )


def covers(grant: str, url: str) -> bool:
    """True when ``url`` lies inside ``grant`` (a prefix or directory; never by string tricks)."""
    if grant.startswith("s3://"):
        return url.startswith(grant)  # grants end with '/' (config check): no 'chem' ~ 'chemx'

    if not url.startswith("/"):
        return False
    base = posixpath.normpath(grant)
    target = posixpath.normpath(url)
    return target == base or target.startswith(base.rstrip("/") + "/")


def _applies(rule: PolicyRule, user: str, account: str) -> bool:
    return (
        "*" in rule.users
        or user in rule.users
        or "*" in rule.accounts
        or (bool(account) and account in rule.accounts)
    )
