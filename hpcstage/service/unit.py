"""A systemd unit that runs the site daemon (``hpcstage config systemd-unit``).

The unit encodes the daemon's exit statuses (``hpcstage daemon --help``): restarted after a
crash or an error such as an unreachable state database (1), and after losing its lock on the
state (3: a database restart, or an HA peer took over), to stand for election again; not
restarted while its configuration is invalid (78, sysexits.h's EX_CONFIG), so that a typo
does not turn into a restart loop.
"""

from __future__ import annotations

import re
import urllib.parse

EX_CONFIG = 78

# A login name as useradd(8) accepts it by default.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*\$?")

_TEMPLATE = """\
# The hpcstage site daemon as a systemd service. Install it as root:
#   cp hpcstage-daemon.service /etc/systemd/system/
#   systemctl daemon-reload && systemctl enable --now hpcstage-daemon
# Written by `hpcstage config systemd-unit` (scripts/install-prefix runs it); see
# docs/install.md, "Running the daemon".

[Unit]
Description=hpcstage site daemon (Slurm data staging)
{documentation}After=network-online.target munge.service
Wants=network-online.target

[Service]
Type=exec
# The service account: unprivileged, with the SSH key that reaches the nodes' agents and the
# S3 credentials (~/.aws, or the AWS_* variables, e.g. the line below).
User={user}
ExecStart={exec_start} daemon --config {config}
#Environment=AWS_SHARED_CREDENTIALS_FILE=/etc/hpcstage/aws-credentials
# Restarted after a crash or an error (an unreachable state database: exit 1), and after
# losing its lock on the state (exit 3: a database restart, or an HA peer took over), to
# stand for election again. Not restarted while its configuration is invalid (exit 78).
Restart=on-failure
RestartSec=5
RestartPreventExitStatus={ex_config}
# SIGTERM drains: running transfers go back to the queue and resume at the next start.
TimeoutStopSec=60
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""


def exec_argument(value: str, *, command: bool = False) -> str:
    """``value`` as one ExecStart= word: double-quoted with systemd's C-style escapes, ``%``
    taken literally (not a specifier), and ``$`` too (not a variable; systemd expands
    variables only after the ``command``, the first word, and leaves its ``$$`` as is)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"control characters are not supported in a unit's command: {value!r}")
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (quoted if command else quoted.replace("$", "$$")) + '"'


def render_unit(executable: str, config: str, user: str, docs: str | None = None) -> str:
    """The unit running ``executable daemon --config config`` as ``user``; ``docs``: a local
    file to name in Documentation= (the installed install.md). Paths must be absolute."""
    for what, path in (("the hpcstage command", executable), ("the configuration", config)):
        if not path.startswith("/"):
            raise ValueError(f"{what} must be an absolute path, got {path!r}")
    if not _USER_NAME.fullmatch(user):
        raise ValueError(f"not a valid user name: {user!r}")
    documentation = ""
    if docs:
        # A URL: percent-encoded, then every % doubled (a specifier otherwise).
        url = "file://" + urllib.parse.quote(docs)
        documentation = f"Documentation={url.replace('%', '%%')}\n"
    return _TEMPLATE.format(
        documentation=documentation,
        user=user,
        exec_start=exec_argument(executable, command=True),
        config=exec_argument(config),
        ex_config=EX_CONFIG,
    )
