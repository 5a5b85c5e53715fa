"""The daemon's sessions with node agents, and the backoff of nodes that failed.

``NodeAgents`` opens one agent session per node on first use (over SSH, or as a local
subprocess), greets it with the store and transfer settings, and holds a node back for a
while after it could not be reached (``core.rules.reconnect_delay``). ``NodePool`` is what
the staging actions ask of it: a fake of those methods runs them without a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from hpcstage.config.schema import Settings
from hpcstage.core.fencing import Epoch
from hpcstage.core.nodes import cache_dir_for, expand_node_template
from hpcstage.core.power import Awake
from hpcstage.core.rules import reconnect_delay
from hpcstage.errors import SlurmError
from hpcstage.protocol.framing import RpcClient
from hpcstage.protocol.messages import (
    AgentCacheSettings,
    AgentStoreSettings,
    AgentTransferSettings,
    HelloRequest,
)
from hpcstage.staging.access import StoreAccess
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.pool import (
    AgentPool,
    AgentSession,
    Liveness,
    SshTarget,
    agent_argv,
    agent_command,
    agent_shell_command,
    open_local,
    open_ssh,
)
from hpcstage.watch.slurm.backend import SlurmBackend

log = logging.getLogger("hpcstage.daemon")  # the name sites filter on (the module moved)


class NodePool(Protocol):
    """What staging actions ask of the node sessions."""

    async def agent(self, node: str) -> RpcClient:
        """The live agent on ``node``; TransportError when it cannot be reached."""
        ...

    def node_failed(self, node: str) -> None:
        """Count a transport failure on ``node`` and hold its next attempt back."""
        ...

    def backing_off(self, node: str) -> bool:
        """True while ``node`` waits out its backoff."""
        ...

    def known_nodes(self) -> list[str]:
        """Nodes Slurm reported at the last refresh."""
        ...

    def powered_down(self, node: str) -> bool:
        """True when Slurm power saving has ``node`` off or booting (no agent can be there)."""
        ...

    def peer_address(self, node: str) -> str:
        """The address ``node``'s agent listens on for a node-to-node copy."""
        ...


class NodeAgents:
    """One agent session per node, with a growing pause after each failure to reach one."""

    def __init__(
        self,
        settings: Settings,
        backend: SlurmBackend,
        access: StoreAccess,
        epoch: Epoch | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.access = access
        # This daemon's leader epoch, handed to every agent it starts (core/fencing.py).
        self.epoch = epoch
        self.pool = AgentPool(self._open_agent, self._hello)
        # nodes.agent_command, or our own hpcstage's
        self.agent_command = agent_command(settings.nodes.agent_command)
        self._node_addr: dict[str, str] = {}
        self._node_state: dict[str, str] = {}  # "IDLE+CLOUD+POWERED_DOWN", at the last refresh
        self._listed_at: dict[str, float] = {}  # when Slurm last listed each node
        self._first_listing: float | None = None
        # node -> (consecutive transport failures, time before which it is not tried again)
        self._node_down: dict[str, tuple[int, float]] = {}

    async def agent(self, node: str) -> RpcClient:
        """The live agent on ``node`` (a success ends its backoff)."""
        rpc = await self.pool.get(node)
        self._node_down.pop(node, None)
        return rpc

    def node_failed(self, node: str) -> None:
        """Count a transport failure on ``node`` and hold its next attempt back (capped)."""
        failures = self._node_down.get(node, (0, 0.0))[0] + 1
        delay = reconnect_delay(failures)
        self._node_down[node] = (failures, time.time() + delay)
        log.warning("node %s: next attempt in %.0f s (failure %d in a row)", node, delay, failures)

    def backing_off(self, node: str) -> bool:
        """True while ``node`` waits out its backoff (the main loop polls, so it is retried)."""
        down = self._node_down.get(node)
        return down is not None and time.time() < down[1]

    def open_nodes(self) -> list[str]:
        """Nodes with a live session."""
        return self.pool.open_nodes()

    async def close(self) -> None:
        """Close every session."""
        await self.pool.close()

    async def _open_agent(self, node: str) -> AgentSession:
        nodes = self.settings.nodes
        cache_dir = cache_dir_for(nodes.cache_dir, node)
        if nodes.transport == "local":
            argv = agent_argv(self.agent_command, node, cache_dir, self.epoch)
            return await open_local(node, argv, nodes.rpc_idle_timeout)
        if node not in self._node_addr:
            await self.refresh_nodes()
        target = SshTarget(
            host=expand_node_template(nodes.address, node, self._node_addr.get(node, node)),
            port=nodes.ssh_port,
            user=nodes.ssh_user,
            key=str(nodes.ssh_key),
            known_hosts=str(nodes.ssh_known_hosts),
            command=agent_shell_command(self.agent_command, node, cache_dir, self.epoch),
            connect_timeout=nodes.connect_timeout,
            liveness=Liveness(
                keepalive_interval=nodes.keepalive_interval,
                keepalive_count_max=nodes.keepalive_count_max,
                rpc_idle_timeout=nodes.rpc_idle_timeout,
            ),
        )
        return await open_ssh(node, target)

    async def _hello(self, node: str, rpc: RpcClient) -> None:
        s, t = self.settings.store, self.settings.transfer
        store = AgentStoreSettings(
            endpoint_url=s.endpoint_url,
            region=self.access.region,
            addressing_style=s.addressing_style,
            verify_tls=s.verify_tls,
            ca_bundle=str(s.ca_bundle or ""),
            max_connections=s.max_connections,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            credentials=self.access.credentials,
        )
        transfer = AgentTransferSettings(
            concurrency=t.concurrency,
            part_size=t.part_size,
            multipart_threshold=t.multipart_threshold,
            retries=t.retries,
            backoff_base=t.backoff_base,
            backoff_max=t.backoff_max,
            lean_get=t.lean_get,
            direct_writes=t.direct_writes,
        )
        cache = AgentCacheSettings(durable_before_read=self.settings.cache.durable_before_read)
        reply = await AgentClient(rpc, node).hello(HelloRequest(store, transfer, cache, self.epoch))
        log.info("agent on %s ready: %s", node, reply.reconcile)

    async def refresh_nodes(self) -> None:
        """Ask Slurm for its nodes and their addresses (kept as they were if it cannot say)."""
        try:
            nodes = await self.backend.nodes()
        except SlurmError as exc:
            log.warning("cannot list nodes: %s", exc)
            return
        self._node_addr = {n.name: n.addr or n.hostname or n.name for n in nodes}
        self._node_state = {n.name: n.state for n in nodes}
        now = time.time()
        self._first_listing = self._first_listing or now
        self._listed_at = {**self._listed_at, **dict.fromkeys(self._node_state, now)}

    def known_nodes(self) -> list[str]:
        """Nodes Slurm reported at the last refresh."""
        return sorted(self._node_addr)

    def awake(self) -> Awake:
        """The Slurm nodes that were up at the last refresh (core/power.py); a node not
        listed counts as asleep for a bounded time only (``UNLISTED_ASLEEP``)."""
        now = time.time()
        return Awake(self._node_state, self._listed_at, self._first_listing or now, now)

    def powered_down(self, node: str) -> bool:
        """True when, at the last refresh, Slurm power saving had ``node`` off or booting.

        Only with ``slurm.power_saving``: else node states are not watched and nothing is.
        A node Slurm did not list counts as off (a hidden cloud node) for a bounded time
        (``core.power.UNLISTED_ASLEEP``), a cache-cluster node never (it need not be a
        Slurm node)."""
        if not self.settings.slurm.power_saving or node in self.settings.cache.cluster_nodes:
            return False
        return node not in self.awake()

    def peer_address(self, node: str) -> str:
        """``transfer.peer_address`` for ``node`` (its NodeAddr by default)."""
        template = self.settings.transfer.peer_address
        return expand_node_template(template, node, self._node_addr.get(node, node))

    async def unknown_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` Slurm does not know (asked again first if any looks new).

        Empty when Slurm's node list cannot be had at all: then the agent connection is
        what fails, with its own message.
        """
        cluster = set(self.settings.cache.cluster_nodes)  # cache nodes may be outside Slurm
        missing = [n for n in nodes if n not in self._node_addr and n not in cluster]
        if missing:
            await self.refresh_nodes()
            missing = [n for n in missing if n not in self._node_addr]
        return missing if self._node_addr else []
