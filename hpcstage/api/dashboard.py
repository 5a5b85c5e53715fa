"""The dashboard page: one self-contained HTML table, no JavaScript framework."""

from __future__ import annotations

import html
import time
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35em .6em;text-align:left;font-size:.92em}
th{background:#f3f3f3}.ready{color:#08660d}.failed{color:#b00020}.staging{color:#a15c00}
.err{color:#b00020;font-size:.85em}
"""


def render_dashboard(jobs: list[dict[str, Any]], version: str, viewer: str) -> str:
    """HTML for the newest jobs ``viewer`` may see; the page refreshes itself every 5 seconds."""
    rows = "\n".join(_row(j) for j in jobs) or '<tr><td colspan="7">no jobs yet</td></tr>'
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>hpcstage</title><style>{_STYLE}</style></head>
<body><h1>hpcstage {html.escape(version)}</h1><p>Jobs with staging directives, newest first
 ({stamp}), as seen by {html.escape(viewer)}. From a shell: <code>hpcstage status</code>.</p>
<table><tr><th>job</th><th>user</th><th>name</th><th>Slurm state</th><th>planned</th>
<th>nodes</th><th>staging per node</th></tr>
{rows}</table></body></html>"""


def _row(job: dict[str, Any]) -> str:
    ident = job["job_id"] if job["kind"] == "job" else f"warmup {job['id']}"
    staging = ", ".join(
        f'<span class="{html.escape(s)}">{html.escape(n)}: {html.escape(s)}</span>'
        for n, s in sorted(job["staging"].items())
    )
    err = f'<div class="err">{html.escape(job["error"])}</div>' if job["error"] else ""
    cells = [
        html.escape(str(ident)),
        html.escape(job["user"]),
        html.escape(job["name"]),
        html.escape(job["state"]),
        html.escape(",".join(job["planned_nodes"])),
        html.escape(",".join(job["nodes"])),
        staging + err,
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_login_needed(reason: str) -> str:
    """The page shown without a valid session: how to get one."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hpcstage</title>
<style>{_STYLE}</style></head><body><h1>hpcstage</h1>
<p>{html.escape(reason)}.</p>
<p>The dashboard shows you your own jobs. To open it, run this on a login node and open
the link it prints (valid for a minute, once):</p><pre>hpcstage dashboard</pre></body></html>"""
