"""The Docker provider: a Service that keeps the live map in step with a Docker (or Podman) daemon.

One connection to the daemon goes through these steps, and again after the daemon went
away (with capped exponential backoff; the map is kept as it is meanwhile, stale but
serving):

1. negotiate the API version (``GET /version``);
2. follow ``GET /events`` (containers: start, die, stop, destroy, pause, unpause,
   health_status, rename; networks: connect, disconnect), queueing what it says;
3. resync: list the labelled containers (``GET /containers/json``), inspect each, write
   what they ask for and remove the provider's entries whose container vanished;
4. then for each event, inspect the one container it names again and write the result.

Inspections run a few at a time (``concurrency``), one at a time per container (an event
for a container being inspected marks it for one more inspection afterwards, so a burst
of events costs at most two).  The provider writes only entries it owns (``source
"docker"``) and never one the admin API wrote.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hoodyproxy.directory.docker._engine import EngineClient, EngineError, NotFound
from hoodyproxy.directory.docker._labels import DOCKER_ID, Reading, preferred, read_container

log = Logger()

SOURCE = "docker"
#: The container events that may change what a container asks of the map.
CONTAINER_EVENTS = ("start", "die", "stop", "destroy", "pause", "unpause", "health_status", "rename")
#: Network events: a running container joined or left a network (its address may change).
NETWORK_EVENTS = ("connect", "disconnect")


def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this host's (binding to it succeeds): a bridge network
    whose gateway address is here is a network the gateway reaches directly."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except (OSError, ValueError):
        return False


class DockerProvider(service.Service):
    """Keeps the live map (``directory``: a :class:`hoodyproxy.directory.SQLiteDirectory`)
    in step with the daemon on the UNIX socket ``socket_path`` (or ``tcp://host:port``, a
    read-only socket proxy)."""

    #: Seconds before the first reconnection, doubled at each failure up to backoff_max.
    backoff_initial = 0.25
    backoff_max = 30.0
    #: Inspections in flight at once.
    concurrency = 8
    #: Seconds each API call (not the events stream) may take.
    request_timeout = 30.0

    def __init__(self, directory, socket_path: str, reactor, *, label_prefix: str = "hoody.",
                 network: str = "", is_local=is_local_address, client_factory=EngineClient) -> None:
        self.directory = directory
        self.socket_path = socket_path
        self.reactor = reactor
        self.label_prefix = label_prefix
        self.network = network or None
        self.is_local = is_local
        self.client_factory = client_factory
        #: The labelled Docker containers as last inspected, by Docker id.
        self.seen: dict[str, Reading] = {}
        #: Completed resyncs (the first at start, one more after each reconnection).
        self.resyncs = 0
        self._client: EngineClient | None = None
        self._events = None
        self._stopping = False
        self._loop: defer.Deferred | None = None
        self._sleeping: defer.Deferred | None = None
        self._requests: set[defer.Deferred] = set()
        self._semaphore = defer.DeferredSemaphore(self.concurrency)
        # Events wait here while a resync runs (Docker ids: bounded by the host's containers).
        self._syncing = True
        self._queued: set[str] = set()
        self._inflight: set[str] = set()
        self._again: set[str] = set()
        # What was last logged, so that a repeated inspection does not repeat the line.
        self._problems: dict[str, str] = {}
        self._left_alone: set[str] = set()
        self._chosen: dict[str, str] = {}

    # -- the service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("docker: the provider stopped", f))

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._events is not None:
            self._events.stop()
        if self._sleeping is not None:
            self._sleeping.cancel()
        for request in list(self._requests):
            request.cancel()
        if self._loop is None:
            return None
        return self._loop.addTimeout(10, self.reactor).addErrback(lambda f: None)

    # -- one connection after another -------------------------------------------------

    async def _run(self) -> None:
        delay, failures = self.backoff_initial, 0
        while not self._stopping:
            client = self._client = self.client_factory(self.reactor, self.socket_path,
                                                        timeout=self.request_timeout)
            try:
                ended = await self._connect(client)
                delay, failures = self.backoff_initial, 0
                reason = await ended
                if not self._stopping:
                    log.warn("docker: the events stream of {socket} ended ({reason}); the live map stays "
                             "as it is until the provider has reconnected and resynced",
                             socket=self.socket_path, reason=_describe(reason))
            except Exception as e:
                if self._stopping:
                    break
                failures += 1
                if failures == 1 or delay >= self.backoff_max:
                    log.warn("docker: cannot follow the Docker API on {socket}: {error}; the live map stays "
                             "as it is; retrying (backoff up to {most:g} s)", socket=self.socket_path,
                             error=_describe(e), most=self.backoff_max)
            finally:
                self._events = None
                self._syncing = True
                await client.close()
            if self._stopping:
                break
            self._sleeping = deferLater(self.reactor, delay, lambda: None)
            try:
                await self._sleeping
            except defer.CancelledError:
                break
            finally:
                self._sleeping = None
            delay = min(delay * 2, self.backoff_max)

    async def _connect(self, client: EngineClient) -> defer.Deferred:
        """Negotiate, follow the events, resync; returns the Deferred the end of the events
        stream fires."""
        version = await self._track(client.negotiate())
        self._syncing = True
        self._queued.clear()
        filters = {"type": ["container", "network"], "event": [*CONTAINER_EVENTS, *NETWORK_EVENTS]}
        self._events = await self._track(client.follow("/events", {"filters": filters}, self._event_line))
        try:
            await self._resync(client)
        except BaseException:
            self._events.stop()
            raise
        self._syncing = False
        queued, self._queued = self._queued, set()
        for docker_id in sorted(queued):
            self._schedule(docker_id)
        self.resyncs += 1
        routed = sum(1 for r in self.seen.values() if r.entry is not None)
        log.info("docker: following {socket} (API {version}): {labelled} labelled containers, {routed} in the "
                 "live map", socket=self.socket_path, version=version or "the daemon's own, /version being refused",
                 labelled=len(self.seen), routed=routed)
        return self._events.ended

    def _track(self, awaitable) -> defer.Deferred:
        """Run ``awaitable`` as a Deferred that stopService cancels."""
        d = defer.ensureDeferred(awaitable)
        self._requests.add(d)

        def untrack(result):
            self._requests.discard(d)
            return result
        return d.addBoth(untrack)

    # -- resync -----------------------------------------------------------------------

    async def _resync(self, client: EngineClient) -> None:
        """Make the map what the daemon has now, removing the provider's entries whose
        container vanished (while the provider was away, or before this node started)."""
        listed = await self._track(client.get("/containers/json", {
            "all": "1", "filters": {"label": [self.label_prefix + "project"]}}))
        if not isinstance(listed, list):
            raise EngineError("/containers/json answered something that is not a list")
        ids = sorted({c["Id"] for c in listed if isinstance(c, dict) and isinstance(c.get("Id"), str)})
        readings: dict[str, Reading] = {}

        async def inspect(docker_id: str) -> None:
            reading = await self._inspect(client, docker_id)
            if reading is not None:
                readings[docker_id] = reading
        await defer.gatherResults(
            [self._semaphore.run(lambda i=docker_id: self._track(inspect(i))) for docker_id in ids],
            consumeErrors=True).addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError)
                                           else f)
        previous, self.seen = self.seen, readings
        for docker_id in set(self._problems) - set(readings):
            del self._problems[docker_id]
        for reading in readings.values():
            self._report(reading)
        owned = {c.id for c in self.directory.list() if c.source == SOURCE}
        affected = owned | {r.entry_id for r in (*previous.values(), *readings.values()) if r.entry_id}
        for entry_id in sorted(affected):
            self._apply(entry_id)

    # -- events -----------------------------------------------------------------------

    def _event_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.warn("docker: an events line that is not JSON was skipped ({size} bytes)", size=len(line))
            return
        if not isinstance(event, dict):
            return
        actor = event.get("Actor") if isinstance(event.get("Actor"), dict) else {}
        attributes = actor.get("Attributes") if isinstance(actor.get("Attributes"), dict) else {}
        action = str(event.get("Action") or event.get("status") or "").partition(":")[0]
        kind = event.get("Type")
        if kind == "container" and action in CONTAINER_EVENTS:
            docker_id = actor.get("ID") or event.get("id")
            # A start is looked at even without the label among the event's attributes
            # (a runtime may not send labels with its events).
            if docker_id in self.seen or self.label_prefix + "project" in attributes or action == "start":
                self._schedule(docker_id)
        elif kind == "network" and action in NETWORK_EVENTS:
            docker_id = attributes.get("container")
            if docker_id in self.seen:
                self._schedule(docker_id)

    def _schedule(self, docker_id: Any) -> None:
        """Inspect ``docker_id`` again (once more after the inspection in flight, if any)."""
        if not isinstance(docker_id, str) or not DOCKER_ID.match(docker_id) or self._stopping:
            return
        if self._syncing:
            self._queued.add(docker_id)
            return
        if docker_id in self._inflight:
            self._again.add(docker_id)
            return
        self._inflight.add(docker_id)
        d = self._semaphore.run(lambda: self._track(self._refresh(docker_id)))
        d.addErrback(self._refresh_failed, docker_id)
        d.addBoth(self._refreshed, docker_id)

    async def _refresh(self, docker_id: str) -> None:
        client = self._client
        if self._stopping:
            return
        if client is None or self._syncing:
            self._queued.add(docker_id)
            return
        reading = await self._inspect(client, docker_id)
        if self._stopping:
            return
        old = self.seen.pop(docker_id, None)
        if reading is not None:
            self.seen[docker_id] = reading
            self._report(reading)
        else:
            self._problems.pop(docker_id, None)
        for entry_id in sorted({old.entry_id if old else None, reading.entry_id if reading else None} - {None}):
            self._apply(entry_id)

    def _refresh_failed(self, failure, docker_id: str) -> None:
        if self._stopping or failure.check(defer.CancelledError):
            return None
        # The daemon going away ends the events stream too: the resync that follows the
        # reconnection inspects this container again.
        log.warn("docker: inspecting container {id} failed: {error}", id=docker_id[:12],
                 error=_describe(failure.value))
        return None

    def _refreshed(self, _, docker_id: str) -> None:
        self._inflight.discard(docker_id)
        if docker_id in self._again:
            self._again.discard(docker_id)
            self._schedule(docker_id)

    # -- reading and writing ----------------------------------------------------------

    async def _inspect(self, client: EngineClient, docker_id: str) -> Reading | None:
        """What ``docker_id`` asks of the map now; None when it is gone or not labelled."""
        try:
            doc = await self._track(client.get(f"/containers/{docker_id}/json"))
        except NotFound:
            return None
        if not isinstance(doc, dict):
            raise EngineError(f"inspecting {docker_id[:12]} answered something that is not an object")
        return read_container(doc, self.label_prefix, self.network, self.is_local,
                              lambda entry_id: self._last_address(docker_id, entry_id))

    def _last_address(self, docker_id: str, entry_id: str) -> str | None:
        """The address a stopped container had (Docker forgets it at the stop): as last
        inspected, else as the map has it from an earlier run of the provider."""
        reading = self.seen.get(docker_id)
        if reading is not None and reading.entry is not None:
            return reading.entry.address
        current = self.directory.lookup(entry_id)
        if current is not None and current.source == SOURCE:
            return current.address
        return None

    def _report(self, reading: Reading) -> None:
        """Log why a labelled container is not routed, once until the reason changes."""
        if reading.problem is None:
            self._problems.pop(reading.docker_id, None)
        elif self._problems.get(reading.docker_id) != reading.problem:
            self._problems[reading.docker_id] = reading.problem
            log.warn("docker: container {name} ({id}): {problem}", name=reading.name,
                     id=reading.docker_id[:12], problem=reading.problem)

    def _apply(self, entry_id: str) -> None:
        """Write entry ``entry_id`` as the Docker containers claiming it ask (remove it when
        none does), if the provider owns it or nobody does."""
        if self._stopping:
            return
        claims = [r for r in self.seen.values() if r.entry_id == entry_id]
        chosen = preferred(claims)
        current = self.directory.lookup(entry_id)
        if chosen is None:
            self._chosen.pop(entry_id, None)
            self._left_alone.discard(entry_id)
            if current is not None and current.source == SOURCE and self.directory.delete(entry_id, SOURCE):
                log.info("docker: {entry} removed from the live map (no container claims it)", entry=entry_id)
            return
        if len(claims) > 1 and self._chosen.get(entry_id) != chosen.docker_id:
            log.warn("docker: containers {names} all claim {entry}; the live map follows {name} ({state}, "
                     "started last)", names=", ".join(sorted(r.name for r in claims)), entry=entry_id,
                     name=chosen.name, state=chosen.entry.state)
        self._chosen[entry_id] = chosen.docker_id
        if current == chosen.entry:
            return
        if (current is not None and current.source != SOURCE) or not self.directory.put_owned(chosen.entry):
            if entry_id not in self._left_alone:
                self._left_alone.add(entry_id)
                log.warn("docker: container {name} is {entry}, which the live map has from the admin API; "
                         "the provider leaves it alone (once it is DELETEd, the container's next event or the next "
                         "resync gives it to the provider)",
                         name=chosen.name, entry=entry_id)
            return
        self._left_alone.discard(entry_id)
        entry = chosen.entry
        log.info("docker: container {name} is {entry} of project {project}: {state} at {address}{ports}",
                 name=chosen.name, entry=entry.id, project=entry.project, state=entry.state,
                 address=entry.address,
                 ports="".join(f", {k}={v}" for k, v in sorted(entry.ports.items())))


def _describe(error: Any) -> str:
    """One line for an error or a connection-lost reason."""
    reasons = getattr(error, "reasons", None)
    if reasons:  # ResponseFailed, ResponseNeverReceived: the Failures inside say more
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__
