"""Admission: find a job's directives where the site says to look, authorize and audit them.

A job outside ``slurm.partitions`` is not ours. Directives come from the first configured
source that has them (``admin_comment`` or the batch script); any refused one (malformed,
or reaching where the policy does not let its user) refuses the whole job, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hpcstage.config.schema import Settings
from hpcstage.core import directives as dirs
from hpcstage.core import policy
from hpcstage.core.rules import describe
from hpcstage.errors import DirectiveError
from hpcstage.watch.fold import Directives
from hpcstage.watch.slurm.backend import SlurmBackend
from hpcstage.watch.slurm.model import JobInfo


@dataclass
class Admission:
    """Reads, authorizes and audits the directives of the jobs the watcher finds."""

    settings: Settings
    backend: SlurmBackend
    audit: Callable[..., None]  # AuditLog.record: (event, **fields); service/ owns the log

    async def directives(self, info: JobInfo) -> Directives:
        """Find a job's directives where the site configured us to look, and authorize them."""
        watched = set(self.settings.slurm.partitions)
        if watched and not set(info.partition.split(",")) & watched:
            return Directives("none", [], [])  # not ours to stage (slurm.partitions)
        for source in self.settings.slurm.directives_from:
            try:
                parsed = await self._parsed(source, info)
            except DirectiveError as exc:  # our block, but unreadable: refuse the job
                found = Directives(source, [], [], error=str(exc))
            else:
                if parsed is None:
                    continue
                found = self._authorized(to_directives(source, parsed, info), info)
            self._audit_admission(found, info)
            return found
        return Directives("none", [], [])

    def _authorized(self, found: Directives, info: JobInfo) -> Directives:
        """Refuse the job if any directive reaches where its user/account may not."""
        wanted: list[tuple[policy.Access, str, str]] = [
            ("read", dirs.policy_url(str(d["src"])), str(d["text"])) for d in found.stage_in
        ]
        wanted += [("write", str(d["dest"]), str(d["text"])) for d in found.stage_out]
        refusals = []
        for access, url, text in wanted:
            decision = policy.check(self.settings.policy, info.user, info.account, access, url)
            if not decision.allowed:
                refusals.append(f"{text}: refused: {decision.rule}")
        if not refusals:
            return found
        return Directives(found.source, [], [], error="; ".join(refusals))

    def _audit_admission(self, found: Directives, info: JobInfo) -> None:
        who = {"job": info.job_id, "user": info.user, "account": info.account}
        if found.error:
            self.audit("refused", **who, reason=found.error, source=found.source)
            return
        for d in found.stage_in:
            self.audit("stage-in", **who, src=d["src"], dest=d["dest"])
        for d in found.stage_out:
            self.audit("stage-out", **who, src=d["src"], dest=d["dest"])

    async def _parsed(self, source: str, info: JobInfo) -> dirs.ParsedDirectives | None:
        if source == "admin_comment":
            args = dirs.decode_admin_comment(info.admin_comment)
            return None if args is None else dirs.parse_args(args)
        script = await self.backend.batch_script(info.job_id)
        return None if script is None else dirs.parse_script(script)


def to_directives(source: str, parsed: dirs.ParsedDirectives, info: JobInfo) -> Directives:
    """What the watcher stores; any refused directive becomes the job's error."""
    if parsed.errors:
        problems = [describe(p) for p in parsed.errors]
        return Directives(source, [], [], error=dirs.summarize(problems))
    context = dirs.JobContext(
        job_id=info.job_id,
        user=info.user,
        name=info.name,
        array_job_id=info.array_job_id,
        array_task_id=info.array_task_id,
    )
    stage_in: list[dict[str, object]] = [
        {"src": d.src.url, "dest": str(d.dest), "line": d.line, "text": d.text}
        for d in parsed.stage_in
    ]
    try:
        # Expanded here, then checked again: a job name may hold '..' or '/'.
        outs = [dirs.expand_stage_out(d, context) for d in parsed.stage_out]
    except DirectiveError as exc:
        return Directives(source, [], [], error=str(exc))
    stage_out: list[dict[str, object]] = [
        {
            "src": str(d.src),
            "dest": d.dest_url,
            "template": written.dest_url if "%" in written.dest_url else "",
            "line": d.line,
            "text": d.text,
            "when": d.when.value,
            "optional": d.optional,
            "pack": d.pack,
        }
        for d, written in zip(outs, parsed.stage_out, strict=True)
    ]
    return Directives(source, stage_in, stage_out)
