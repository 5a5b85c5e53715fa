"""What the nodes' caches hold of one source, and evicting one source from them.

``hpcstage warmup --check SRC`` asks how much of SRC, as the store holds it now, each node's
cache holds: the daemon lists SRC once (its own S3 client) and asks every node which of those
objects' cache ids it has indexed (``peer_want``, a batch at a time), so a changed object
counts as missing, as a stage would find it, and objects of every size are counted.

``hpcstage cache evict SRC`` has each node evict every cached version of SRC's keys
(``drop_source``), except the objects a job's view links: a running or staged job never
loses a file, and the reply counts what stayed in use.

Both are for whoever may read SRC by the site policy (admins: anything), as a warmup is
(docs/security.md): the numbers say nothing a reader could not learn from the store, and an
eviction costs others a refetch, no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from hpcstage.config.schema import Settings
from hpcstage.core import directives as dirs
from hpcstage.core import limits, policy
from hpcstage.core.directives import Source, SourceKind
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import (
    AgentError,
    DirectiveError,
    LimitError,
    ObjectMissingError,
    TransportError,
)
from hpcstage.protocol.messages import PEER_KINDS, DropSourceReply, SourceSpec
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.nodes import NodeAgents
from hpcstage.store.protocol import ObjectStore

CHECK_BATCH: Final = 5000  # cache ids per peer_want call (about 350 KB on the wire)
CALL_TIMEOUT: Final = 120.0  # seconds for one node's answer (a busy node's index is slow)

OpenStore = Callable[[str], contextlib.AbstractAsyncContextManager[ObjectStore]]
Audit = Callable[..., None]  # AuditLog.record: (event, **fields)
NODE_ERRORS: Final = (AgentError, TransportError, TimeoutError)


@dataclass
class Held:
    """Objects and bytes: of a source, or of what one node's cache holds of it."""

    objects: int = 0
    bytes: int = 0

    def add(self, refs: list[ObjectRef]) -> None:
        self.objects += len(refs)
        self.bytes += sum(r.size for r in refs)

    def percent_of(self, whole: Held, times: int = 1) -> float:
        """This as a percentage of ``times`` copies of ``whole``: by bytes, or by objects
        when the source has no bytes (empty objects); 100 for nothing of nothing."""
        part, of = (self.bytes, whole.bytes) if whole.bytes else (self.objects, whole.objects)
        return 100.0 if of * times == 0 else round(100 * part / (of * times), 1)

    def doc(self, whole: Held, times: int = 1) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "percent": self.percent_of(whole, times),
        }


@dataclass
class _Asked:
    """One node during a check: its agent, what it holds so far, or why it could not say."""

    node: str
    agent: AgentClient | None = None
    held: Held = field(default_factory=Held)
    error: str = ""


@dataclass
class Holdings:
    """Answers ``warmup --check`` and ``cache evict SRC`` through the nodes' agents."""

    settings: Settings
    nodes: NodeAgents
    stores: OpenStore
    audit: Audit
    # Per user: who has a check or evict running, and when they asked (the last minute's).
    _busy: set[str] = field(default_factory=set)
    _asked: dict[str, list[float]] = field(default_factory=dict)

    def allowed(self, src: str, user: str, admin: bool, verb: str) -> Source:
        """SRC as a source ``user`` may ``verb``: DirectiveError when SRC is malformed or not
        an S3 object or prefix, PermissionError when the policy does not let ``user`` read
        it (admins: anything)."""
        source = dirs.parse_value("stage-in", src).src
        if source.kind not in PEER_KINDS:
            # A packed dataset is one tree per node, a shared path is not the store's.
            raise DirectiveError(
                f"{verb} covers s3://bucket/key and s3://bucket/prefix/ sources, not {src}"
            )
        decision = policy.check(self.settings.policy, user, "", "read", source.policy_url)
        if not (admin or decision.allowed):
            self.audit("refused", user=user, src=src, action=verb, reason=decision.rule)
            raise PermissionError(f"{verb} of {src} refused: {decision.rule}")
        return source

    async def check(self, src: str, nodes: list[str], user: str, admin: bool) -> dict[str, Any]:
        """How much of SRC's current objects each node's cache holds, and in all.

        ObjectMissingError when SRC names no object; a node that cannot be asked has an
        ``error`` and counts as holding nothing in the total."""
        # The turn first: a refusal by the policy is audited, and costs its turn too.
        with self._turn(user, admin, "cache check", src):
            source = self.allowed(src, user, admin, "cache check")
            most = self.settings.limits.stage_in_objects if not admin else 0
            return await self._check(source, nodes, most)

    async def _check(self, source: Source, nodes: list[str], most: int) -> dict[str, Any]:
        asked = await asyncio.gather(*(self._ask(node) for node in dict.fromkeys(nodes)))
        whole = Held()
        async with self.stores(source.bucket) as store:
            async for batch in _batches(_listing(store, source), CHECK_BATCH):
                whole.add(batch)
                if most and whole.objects > most:
                    raise DirectiveError(
                        f"{source.url} holds more than {most:,} objects, the most a check"
                        " lists (limits.stage_in_objects, as for a stage-in): check a"
                        " narrower prefix"
                    )
                ids = await asyncio.to_thread(_cache_ids, batch)
                live = [a for a in asked if a.agent is not None]
                await asyncio.gather(*(_count(a, batch, ids) for a in live))
        if whole.objects == 0:
            raise ObjectMissingError(f"no objects under {source.url}")
        return _check_doc(source.url, whole, asked)

    async def evict(self, src: str, nodes: list[str], user: str, admin: bool) -> dict[str, Any]:
        """Evict SRC's cached objects on ``nodes``, those in use by a job excepted; per node
        what was evicted and kept (or why the node could not be asked), and the sums."""
        with self._turn(user, admin, "cache evict", src):
            return await self._evict(self.allowed(src, user, admin, "cache evict"), nodes, user)

    async def _evict(self, source: Source, nodes: list[str], user: str) -> dict[str, Any]:
        if source.filter or source.version_id:
            # A node evicts by key, every cached version: a narrower eviction would need
            # the globs and versions on the node's side, for little use.
            raise DirectiveError(
                f"cache evict of {source.url}: evicts a whole object or prefix (every cached"
                " version), without include/exclude globs or ?versionId"
            )
        spec = SourceSpec.of(source.url)
        names = list(dict.fromkeys(nodes))
        replies = await asyncio.gather(*(self._drop(node, spec) for node in names))
        per_node = dict(zip(names, replies, strict=True))
        doc = _evict_doc(source.url, per_node)
        self.audit("cache-evict", user=user, src=source.url, nodes=names, **doc["total"])
        return doc

    @contextlib.contextmanager
    def _turn(self, user: str, admin: bool, verb: str, src: str) -> Iterator[None]:
        """Run one check or evict of ``user``'s, or raise LimitError: a reader could otherwise
        have the daemon list a prefix of 10^8 objects again and again, or make others
        refetch a shared dataset in a loop (admins: no limit)."""
        if admin:
            yield
            return
        now = time.monotonic()
        recent = [t for t in self._asked.get(user, []) if now - t < 60.0]
        refusal = limits.cache_request_refusal(
            self.settings.limits, user in self._busy, len(recent)
        )
        if refusal:
            self.audit("refused", user=user, src=src, action=verb, reason=refusal)
            raise LimitError(f"{verb} of {src} refused: {refusal}")
        self._asked[user] = [*recent, now]
        self._busy.add(user)
        try:
            yield
        finally:
            self._busy.discard(user)

    async def _ask(self, node: str) -> _Asked:
        try:
            return _Asked(node, AgentClient(await self.nodes.agent(node), node))
        except NODE_ERRORS as exc:
            return _Asked(node, error=f"cannot reach the agent on {node}: {exc}")

    async def _drop(self, node: str, spec: SourceSpec) -> DropSourceReply | str:
        try:
            agent = AgentClient(await self.nodes.agent(node), node)
            return await asyncio.wait_for(agent.drop_source(spec), CALL_TIMEOUT)
        except NODE_ERRORS as exc:
            return f"cannot evict on {node}: {exc}"


async def _listing(store: ObjectStore, source: Source) -> AsyncIterator[ObjectRef]:
    """The objects of ``source`` a stage would fetch now: one HEAD (of the pinned version,
    if any), or the listing of the prefix that its include/exclude globs take."""
    if source.kind is SourceKind.S3_OBJECT:
        yield await store.head(source.key, version_id=source.version_id)
        return
    async for ref in store.list(source.key):
        if not source.filter or source.filter.takes(ref.key[len(source.key) :]):
            yield ref


async def _batches(refs: AsyncIterator[ObjectRef], size: int) -> AsyncIterator[list[ObjectRef]]:
    batch: list[ObjectRef] = []
    async for ref in refs:
        batch.append(ref)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def _count(asked: _Asked, batch: list[ObjectRef], ids: list[str]) -> None:
    """Add what ``asked``'s cache holds of ``batch`` (``ids``: their cache ids); on failure,
    stop asking that node."""
    assert asked.agent is not None
    try:
        reply = await asyncio.wait_for(asked.agent.peer_want(ids), CALL_TIMEOUT)
    except NODE_ERRORS as exc:
        asked.agent, asked.error = None, f"cannot ask the agent on {asked.node}: {exc}"
        return
    missing = set(reply.want)
    asked.held.add([r for r, i in zip(batch, ids, strict=True) if i not in missing])


def _cache_ids(batch: list[ObjectRef]) -> list[str]:
    # A cache id is a SHA-256 of the object's identity, made each time it is read: 5,000 of
    # them per node on the event loop would stall the API and the agents' sessions.
    return [r.cache_id for r in batch]


def _check_doc(url: str, whole: Held, asked: Sequence[_Asked]) -> dict[str, Any]:
    total = Held()
    nodes: dict[str, Any] = {}
    for a in asked:
        if a.error:
            nodes[a.node] = {"error": a.error}
            continue
        nodes[a.node] = a.held.doc(whole)
        total.objects, total.bytes = total.objects + a.held.objects, total.bytes + a.held.bytes
    return {
        "src": url,
        "objects": whole.objects,
        "bytes": whole.bytes,
        "nodes": nodes,
        "total": total.doc(whole, len(asked)),
    }


_EVICT_FIELDS: Final = ("evicted", "evicted_bytes", "in_use", "in_use_bytes")


def _evict_doc(url: str, per_node: dict[str, DropSourceReply | str]) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    total = dict.fromkeys(_EVICT_FIELDS, 0)
    for node, reply in per_node.items():
        if isinstance(reply, str):
            nodes[node] = {"error": reply}
            continue
        nodes[node] = {f: getattr(reply, f) for f in _EVICT_FIELDS}
        total = {f: total[f] + nodes[node][f] for f in _EVICT_FIELDS}
    return {"src": url, "nodes": nodes, "total": total}
