"""The dashboard page: server-rendered HTML from the dashboard document
(:mod:`hpcstage.api.overview` plus node caches), no JavaScript framework and no build step.

The page works without JavaScript (it reloads itself every few seconds then); with it, a
dozen lines fetch the page again every :data:`REFRESH_SECONDS` and swap its ``<main>`` in
place, so scrolling and the open tab stay put. Everything shown is escaped here.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any

REFRESH_SECONDS = 2

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222}
h1{margin:0 0 .2em}h2{margin:1.4em 0 .4em;font-size:1.15em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;font-size:.9em;
vertical-align:top}
th{background:#f3f3f3}.ready{color:#08660d}.failed{color:#b00020}.staging{color:#a15c00}
.err{color:#b00020;font-size:.85em}.dim{color:#777}.num{text-align:right}
.bar{display:inline-block;width:9em;height:.8em;background:#eee;border-radius:3px;
vertical-align:middle;margin-right:.5em;overflow:hidden}
.bar span{display:block;height:100%;background:#3b7dd8}
.node{margin-right:1.2em;white-space:nowrap}
"""

# Fetch the page again and swap <main>; a lost session shows the login page instead, any
# other failure keeps the page as it is until the next try.
# <body data-refreshes> counts the swaps (how the browser test knows the script works).
_SCRIPT = f"""
setInterval(async () => {{
  try {{
    const r = await fetch(location.pathname, {{credentials: "same-origin"}});
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const fresh = doc.querySelector("main");
    if (r.status === 401) {{ document.body.innerHTML = doc.body.innerHTML; return; }}
    if (!r.ok || !fresh) return;  /* a proxy's or a restarting daemon's error page */
    document.querySelector("main").replaceWith(fresh);
    document.body.dataset.refreshes = (+document.body.dataset.refreshes || 0) + 1;
  }} catch (e) {{ /* the daemon restarting: try again at the next tick */ }}
}}, {REFRESH_SECONDS * 1000});
"""


def render_dashboard(doc: dict[str, Any], version: str) -> str:
    """The whole page for the dashboard document ``doc``."""
    return f"""<!doctype html><html><head><meta charset="utf-8">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>hpcstage {html.escape(doc.get("site", ""))}</title><style>{_STYLE}</style></head>
<body>{render_main(doc, version)}<script>{_SCRIPT}</script></body></html>"""


def render_main(doc: dict[str, Any], version: str) -> str:
    """The part of the page that refreshes: a heading and five sections."""
    return f"""<main><h1>hpcstage {html.escape(version)}</h1>{_header(doc)}
<h2>Node caches</h2>{_nodes(doc["nodes"])}
<h2>Staging now</h2>{_staging(doc["staging"])}
<h2>Waits at job start</h2>{_waits(doc["waits"])}
<h2>Recent errors</h2>{_errors(doc["errors"])}
<h2>Jobs</h2>{_jobs(doc["jobs"])}</main>"""


def _header(doc: dict[str, Any]) -> str:
    whose = "every user's jobs" if doc["admin"] else "your jobs"
    tick = doc.get("last_tick") or 0
    seen = f"{doc['generated_at'] - tick:.0f} s ago" if tick else "not yet"
    problem = doc.get("last_error") or ""
    err = (
        f'<p class="err">last queue snapshot failed: {html.escape(problem)}</p>' if problem else ""
    )
    site, user = html.escape(doc.get("site", "")), html.escape(doc["viewer"])
    return f"""<p>Site {site}, as seen by {user} ({whose}), {_clock(doc["generated_at"])};
the daemon's last look at the queue: {seen}. From a shell: <code>hpcstage status</code>.</p>
{err}"""


def _table(head: Iterable[str], rows: list[list[str]], empty: str) -> str:
    """A table of already escaped cells; ``empty`` in one wide cell when there are no rows."""
    names = list(head)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    body = body or f'<tr><td colspan="{len(names)}" class="dim">{html.escape(empty)}</td></tr>'
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in names) + f"</tr>\n{body}</table>"


def _nodes(rows: list[dict[str, Any]]) -> str:
    def cells(n: dict[str, Any]) -> list[str]:
        used, cap = n["bytes"], n["capacity"]
        fill = _bar(used, cap) + f"{human(used)} of {human(cap)}" if used is not None else "-"
        age = "" if n["age"] is None else f"{n['age']:.0f} s ago"
        age = age or ("" if n["error"] else "asked, no answer yet")
        err = f'<span class="err">{html.escape(n["error"])}</span>' if n["error"] else ""
        rate = n["bytes_per_s"]
        return [
            html.escape(n["node"]),
            fill,
            _count(n["objects"]),
            f"{human(n['leased_bytes'])} in {_count(n['leased_objects'])} objects"
            if used is not None
            else "-",
            "-" if rate is None else f"{human(rate)}/s",
            f'<span class="dim">{age}</span> {err}',
        ]

    head = ("node", "cache used", "objects", "leased by jobs", "into the cache", "answer")
    return _table(head, [cells(n) for n in rows], "no nodes known to Slurm yet")


def _staging(rows: list[dict[str, Any]]) -> str:
    def cells(j: dict[str, Any]) -> list[str]:
        where = "".join(_node_progress(node, p) for node, p in j["progress"].items())
        return [
            _ident(j),
            html.escape(j["user"]),
            html.escape(j["name"]),
            html.escape(j["state"]),
            where,
        ]

    head = ("job", "user", "name", "Slurm state", "inputs per node")
    return _table(head, [cells(j) for j in rows], "nothing is staging")


def _node_progress(node: str, p: dict[str, Any]) -> str:
    state = html.escape(p["state"])
    files = f"{p['files_done']}/{_count(p['files_total'])} files"
    size = f"{human(p['bytes_done'])} of {human(p['bytes_total'])}"
    bar = _bar(p["bytes_done"], p["bytes_total"])
    return (
        f'<div class="node">{html.escape(node)}: <span class="{state}">{state}</span> '
        f"{bar}{files}, {size}</div>"
    )


def _waits(rows: list[dict[str, Any]]) -> str:
    def said(w: dict[str, Any]) -> str:
        if w["inputs"] == "failed":
            return '<span class="failed">inputs failed</span>'
        if w["waited"] is None:
            how = "waiting" if w["inputs"] == "waiting" else "ended without them after"
            return f'<span class="staging">{how} {w["so_far"]:.0f} s</span>'

        if w["waited"] > 0:
            return f'<span class="staging">waited {w["waited"]:.1f} s</span>'
        return f'<span class="ready">ready {-w["waited"]:.1f} s before start</span>'

    def cells(w: dict[str, Any]) -> list[str]:
        return [
            html.escape(str(w["job_id"])),
            html.escape(w["user"]),
            html.escape(w["node"]),
            _clock(w["started_at"]),
            said(w),
        ]

    head = ("job", "user", "node", "started", "inputs ready")
    return _table(head, [cells(w) for w in rows], "no job with inputs has started yet")


def _errors(rows: list[dict[str, Any]]) -> str:
    def cells(e: dict[str, Any]) -> list[str]:
        job = "" if e["job_id"] is None else str(e["job_id"])
        return [
            _clock(e["ts"]),
            html.escape(job),
            html.escape(e["user"]),
            html.escape(e["node"]),
            f'<span class="err">{html.escape(e["message"])}</span>',
        ]

    return _table(("when", "job", "user", "node", "error"), [cells(e) for e in rows], "none")


def _jobs(rows: list[dict[str, Any]]) -> str:
    return _table(
        ("job", "user", "name", "Slurm state", "planned", "nodes", "staging per node"),
        [_job_cells(j) for j in rows],
        "no jobs yet",
    )


def _job_cells(job: dict[str, Any]) -> list[str]:
    staging = ", ".join(
        f'<span class="{html.escape(s)}">{html.escape(n)}: {html.escape(s)}</span>'
        for n, s in sorted(job["staging"].items())
    )
    err = f'<div class="err">{html.escape(job["error"])}</div>' if job["error"] else ""
    return [
        _ident(job),
        html.escape(job["user"]),
        html.escape(job["name"]),
        html.escape(job["state"]),
        html.escape(",".join(job["planned_nodes"])),
        html.escape(",".join(job["nodes"])),
        staging + err,
    ]


def _ident(job: dict[str, Any]) -> str:
    return html.escape(str(job["job_id"] if job["kind"] == "job" else f"{job['kind']} {job['id']}"))


def _bar(done: float | None, total: float | None) -> str:
    if done is None or not total:
        return ""
    width = max(0.0, min(100.0, 100 * done / total))
    return f'<span class="bar" title="{width:.0f}%"><span style="width:{width:.1f}%"></span></span>'


def human(num: float | None) -> str:
    """Bytes for people: ``1536`` -> ``"1.5 KiB"``; None (not known yet) -> ``"?"``."""
    if num is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def render_login_needed(reason: str) -> str:
    """The page shown without a valid session: how to get one."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hpcstage</title>
<style>{_STYLE}</style></head><body><h1>hpcstage</h1>
<p>{html.escape(reason)}.</p>
<p>The dashboard shows you your own jobs. To open it, run this on a login node and open
the link it prints (valid for a minute, once):</p><pre>hpcstage dashboard</pre></body></html>"""
