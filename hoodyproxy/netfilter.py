"""The rules and policy routing that transparent mode needs, installed at start, removed at stop.

A transparent upstream socket (:mod:`hoodyproxy.upstream.transparent`) sends from the
client's address, so the container's replies are addressed to the client.  The gateway
is on their way back; three things hand them to the gateway's own socket instead of
forwarding them on (for IPv4 and IPv6 alike)::

    iptables -t mangle -I PREROUTING -p tcp -m socket --transparent \\
        -m comment --comment hoodyproxy:<node> -j MARK --set-mark <mark>
    ip rule add priority 4870 fwmark <mark> lookup <table>
    ip route add local 0.0.0.0/0 dev lo table <table>        (::/0 for IPv6)

The mangle rule is managed with python-iptables (which drives the legacy x_tables
interface: ``iptables-legacy-save`` shows it), the rule and the route with the ``ip``
command.  The mangle rule carries a comment naming the node *and* its data directory
(``hoodyproxy:<node>:<8 hex digits of a hash of the data directory's real path>``): a
data directory has one node at a time (:mod:`hoodyproxy.datadir`), so the comment is one
running node's, and a start after a crash finds and replaces exactly what the last run
on that data directory left.  The policy rule and route are exactly these (a fixed
priority, the node's mark and table).  Two nodes given the same mark and table (the
defaults) share them -- the kernel cannot hold two copies of that route -- so a stop
takes them away only when no other node's mangle rule with that mark is left; every
other rule, of other nodes or of anything else, is never touched.

The service also flushes the connection-tracking entries towards a container that is
stopped or removed (``conntrack -D -d <address>``), so that an address given to another
container starts clean.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import time
from typing import Callable, Iterable

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger()

#: The bit of CAP_NET_ADMIN in a capability set.
CAP_NET_ADMIN = 12
#: The priority of the policy rule: fixed, so that a later start finds it.
RULE_PRIORITY = 4870
#: How long to wait for another iptables user to finish (they share this lock).
LOCK_TIMEOUT = 10.0
#: How long one ``conntrack -D`` may run before it is killed.
CONNTRACK_TIMEOUT = 10.0


class NetfilterError(Exception):
    """The rules or routes transparent mode needs could not be put in place."""


def has_net_admin(status_path: str = "/proc/self/status") -> bool:
    """True if this process has CAP_NET_ADMIN in its effective set."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def ipv6_enabled() -> bool:
    """True if the kernel has IPv6 (it may be disabled at boot)."""
    return os.path.exists("/proc/net/if_inet6")


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def comment_for(node: str, instance: str | None = None) -> str:
    """The comment that marks a rule as this node's: its name and, given the node's data
    directory as ``instance``, a short hash of that directory's real path (two nodes of
    the same name on two data directories are two nodes)."""
    if instance is None:
        return f"hoodyproxy:{node}"
    digest = hashlib.sha256(os.path.realpath(instance).encode("utf-8", "surrogateescape")).hexdigest()
    return f"hoodyproxy:{node}:{digest[:8]}"


#: The comment of a node's rule as :func:`comment_for` writes it with an instance.
_INSTANCE_COMMENT = re.compile(r"hoodyproxy:[a-z0-9-]{1,63}:[0-9a-f]{8}")


# -- the mangle rule (python-iptables) -----------------------------------------------------

class MangleRule:
    """The mangle PREROUTING rule of one family that marks packets of transparent sockets."""

    def __init__(self, family: int, comment: str, mark: int) -> None:
        self.family = family
        self.comment = comment
        self.mark = mark

    def _chain(self):
        try:
            import iptc
        except Exception as e:  # ImportError, or libxtables/libiptc that will not load
            raise NetfilterError(f"python-iptables is not usable: {e}") from None
        try:
            if self.family == 4:
                table = iptc.Table(iptc.Table.MANGLE, autocommit=False)
            else:
                table = iptc.Table6(iptc.Table6.MANGLE, autocommit=False)
            table.refresh()
        except Exception as e:
            raise NetfilterError(f"cannot read the IPv{self.family} mangle table: {e}") from None
        return iptc, table, iptc.Chain(table, "PREROUTING")

    def _ours(self, chain) -> list:
        return [rule for rule in chain.rules
                if any(m.name == "comment" and m.comment == self.comment for m in rule.matches)]

    def _mark_of(self, rule) -> int | None:
        """The mark a MARK rule sets (``--set-xmark M/0xffffffff`` as the kernel reports it)."""
        if rule.target is None or rule.target.name != "MARK":
            return None
        for values in rule.target.get_all_parameters().values():
            for value in values:
                try:
                    return int(value.split("/")[0], 0)
                except ValueError:
                    pass
        return None

    def shared(self) -> int:
        """How many other nodes' mangle rules set this rule's mark.

        Those nodes use the same policy rule and route (same mark, so same table unless
        misconfigured), which must then outlive this node's stop.  Only comments written by
        :func:`comment_for` with an instance count: a rule of some other form is not a
        running node's we could know of.
        """
        _iptc, _table, chain = self._chain()
        others = 0
        for rule in chain.rules:
            comments = [m.comment for m in rule.matches if m.name == "comment"]
            if any(c != self.comment and _INSTANCE_COMMENT.fullmatch(c or "") for c in comments) \
                    and self._mark_of(rule) == self.mark:
                others += 1
        return others

    def _change(self, add: bool) -> int:
        iptc, table, chain = self._chain()
        try:
            ours = self._ours(chain)
            for rule in ours:
                chain.delete_rule(rule)
            if add:
                rule = iptc.Rule() if self.family == 4 else iptc.Rule6()
                rule.protocol = "tcp"
                rule.create_match("socket").transparent = ""
                rule.create_match("comment").comment = self.comment
                rule.create_target("MARK").set_mark = hex(self.mark)
                chain.insert_rule(rule)
            if ours or add:
                table.commit()  # one replacement of the table: no moment without the rule
        except Exception as e:
            what = "add" if add else "delete"
            raise NetfilterError(f"cannot {what} the IPv{self.family} mangle rule "
                                 f"(-m socket --transparent -j MARK): {e}") from None
        finally:
            table.refresh()
        return len(ours)

    def replace(self) -> int:
        """Delete every rule carrying this node's comment and insert one at the head of mangle
        PREROUTING; returns how many were deleted."""
        return self._change(add=True)

    def remove(self) -> int:
        """Delete every rule carrying this node's comment; returns how many there were."""
        return self._change(add=False)


# -- policy routing (the ip command) ----------------------------------------------------------

_FAILED_LINE = re.compile(r"Command failed -:(\d+)")


def run_ip_batch(family: int, commands: list[str]) -> tuple[set[int], str]:
    """Run ``commands`` with one ``ip -4|-6 -force -batch -``; (numbers of the lines that failed, stderr)."""
    try:
        done = subprocess.run(["ip", f"-{family}", "-force", "-batch", "-"], input="\n".join(commands) + "\n",
                              capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise NetfilterError("the ip command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetfilterError("the ip command did not finish in 10 s") from None
    failed = {int(n) for n in _FAILED_LINE.findall(done.stderr)}
    if done.returncode != 0 and not failed:
        raise NetfilterError(f"ip -{family} -batch failed: {done.stderr.strip() or done.returncode}")
    return failed, done.stderr


class PolicyRouting:
    """``ip rule fwmark MARK lookup TABLE`` and ``ip route local default dev lo table TABLE``.

    Every change of one family is one ``ip -batch`` run: deleting what is there (as many
    copies as a crashed run may have left, up to ``max_leftovers`` of each), then adding.
    """

    max_leftovers = 8

    def __init__(self, family: int, mark: int, table: int,
                 run: Callable[[int, list[str]], tuple[set[int], str]] = run_ip_batch) -> None:
        self.family = family
        self.run = run
        everywhere = "0.0.0.0/0" if family == 4 else "::/0"
        self.rule = f"rule {{}} priority {RULE_PRIORITY} fwmark {mark:#x} lookup {table}"
        self.route = f"route {{}} local {everywhere} dev lo table {table}"

    def _deletions(self) -> list[str]:
        return ([self.rule.format("del")] * self.max_leftovers
                + [self.route.format("del")] * self.max_leftovers)

    def remove(self) -> int:
        """Delete the rule and the route as often as they are there; returns how many went."""
        deletions = self._deletions()
        failed, _ = self.run(self.family, deletions)
        return len(deletions) - len(failed)

    def replace(self) -> int:
        """Delete every copy of the rule and the route, then add one of each; returns how many went."""
        deletions = self._deletions()
        additions = [self.route.format("add"), self.rule.format("add")]
        failed, stderr = self.run(self.family, deletions + additions)
        for number, command in enumerate(additions, len(deletions) + 1):
            if number in failed:
                raise NetfilterError(f"ip -{self.family} {command} failed: {_error_of(stderr, number)}")
        return len(deletions) - len(failed)


def _error_of(stderr: str, number: int) -> str:
    """The message ip printed for batch line ``number`` (the lines before its "Command failed")."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Command failed -:{number}":
            j = i
            while j > 0 and not lines[j - 1].startswith("Command failed"):
                j -= 1
            return " ".join(part.strip() for part in lines[j:i]) or "failed"
    return stderr.strip() or "failed"


# -- the lock iptables users share -----------------------------------------------------------

class XtablesLock:
    """``/run/xtables.lock`` (or ``$XTABLES_LOCKFILE``), as iptables-legacy takes it."""

    def __init__(self, path: str | None = None, timeout: float = LOCK_TIMEOUT) -> None:
        self.path = path or os.environ.get("XTABLES_LOCKFILE") or "/run/xtables.lock"
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> "XtablesLock":
        try:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            self.fd = None  # no lock file possible: go on unlocked, as iptables does
            return self
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise NetfilterError(f"another iptables user holds {self.path}") from None
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- the service --------------------------------------------------------------------------

class NetfilterService(service.Service):
    """Installs the transparent-mode rules at (privileged) start and removes them at stop.

    With ``required`` False (the ``auto`` mode) a failure to install is not fatal: the
    service remembers it in ``failed`` and the node falls back to forwarding headers.
    """

    name = "netfilter"

    def __init__(self, node: str, mark: int, table: int, *, required: bool, directory=None,
                 reactor=None, families: Iterable[int] | None = None,
                 mangle: Callable[[int], MangleRule] | None = None,
                 routing: Callable[[int], PolicyRouting] | None = None,
                 lock: Callable[[], XtablesLock] = XtablesLock,
                 conntrack: str | None = None, instance: str | None = None) -> None:
        self.node = node
        #: ``instance`` is the node's data directory: its hash in the comment tells this
        #: node's rules from those of a node of the same name on another data directory.
        self.comment = comment_for(node, instance)
        self.mark = mark
        self.table = table
        self.required = required
        self.directory = directory
        self.reactor = reactor
        self.families = tuple(families) if families is not None else ((4, 6) if ipv6_enabled() else (4,))
        self._mangle = mangle or (lambda family: MangleRule(family, self.comment, mark))
        self._routing = routing or (lambda family: PolicyRouting(family, mark, table))
        self._lock = lock
        self.conntrack = conntrack if conntrack is not None else shutil.which("conntrack")
        self.installed = False
        self.families_installed: tuple[int, ...] = ()
        self.failed: NetfilterError | None = None
        #: Why IPv6 could not be set up while IPv4 was (IPv6 clients then get headers only).
        self.ipv6_problem: NetfilterError | None = None
        self._addresses: dict[str, str] = {}
        self._subscribed = False
        self._flushing: set[_Conntrack] = set()

    # -- rules --------------------------------------------------------------------------

    def install(self) -> int:
        """Remove what an earlier run of this node left, then add the rules and routes.

        Returns how many leftovers were removed.  On failure, whatever was added is taken
        away again and :class:`NetfilterError` is raised.
        """
        leftovers = 0
        self.ipv6_problem = None
        with self._lock():
            installed = []
            for family in self.families:
                try:
                    mangle = self._mangle(family)
                    leftovers += mangle.replace()
                    replaced = self._routing(family).replace()
                    # Another running node's policy rule and route are not leftovers.
                    leftovers += 0 if _shared(mangle) else replaced
                    installed.append(family)
                except NetfilterError as e:
                    # IPv6 may be disabled (a container's default): then IPv4 goes on alone.
                    alone = family == 6 and bool(installed)
                    try:
                        self._remove_all([family] if alone else installed + [family])
                    except NetfilterError:
                        pass
                    if not alone:
                        raise
                    self.ipv6_problem = e
        self.families_installed = tuple(installed)
        self.installed = True
        return leftovers

    def _remove_all(self, families: Iterable[int] | None = None) -> int:
        """Remove this node's mangle rules, and the policy rule and route unless another
        node's mangle rule still needs them (the same mark: see the module docstring)."""
        removed = 0
        for family in self.families if families is None else families:
            mangle = self._mangle(family)
            removed += mangle.remove()
            others = _shared(mangle)
            if others:
                log.info("hoodyproxy client IP: the IPv{family} policy rule and route of mark {mark} stay: "
                         "{n} other node(s) in this network namespace use them", family=family,
                         mark=f"{self.mark:#x}", n=others)
                continue
            removed += self._routing(family).remove()
        return removed

    def uninstall(self) -> None:
        """Remove this node's rules and routes (errors are logged: the next start retries)."""
        if not self.installed:
            return
        self.installed = False
        try:
            with self._lock():
                self._remove_all(self.families_installed)
        except NetfilterError as e:
            log.error("hoodyproxy client IP: could not remove the netfilter rules ({error}); the next "
                      "start removes them", error=str(e))

    # -- the Service --------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            leftovers = self.install()
        except NetfilterError as e:
            if self.required:
                raise
            self.failed = e
            return
        if self.ipv6_problem is not None:
            log.warn("hoodyproxy client IP: IPv6 is not transparent on this host ({problem}); IPv6 "
                     "clients are served with forwarding headers only", problem=str(self.ipv6_problem))
        if leftovers:
            log.info("hoodyproxy client IP: replaced {n} netfilter rule(s) or route(s) an earlier run of "
                     "{node} left", n=leftovers, node=self.node)
        # Said plainly, since they change the host (its network namespace), not just this process.
        families = "/".join(f"IPv{f}" for f in self.families_installed)
        log.info("hoodyproxy client IP: installed netfilter rules and routes in this network namespace "
                 "({families}): a mangle PREROUTING rule with comment {comment} (MARK {mark}), "
                 "'ip rule priority {priority} fwmark {mark} lookup {table}' and a local route in table "
                 "{table}; a clean stop (SIGTERM, Ctrl-C) removes them, and the next start on this data "
                 "directory replaces what a killed node left", families=families, comment=self.comment,
                 mark=f"{self.mark:#x}", priority=RULE_PRIORITY, table=self.table)

    def startService(self) -> None:
        super().startService()
        if self.installed and self.directory is not None and not self._subscribed:
            self._subscribed = True
            if self.conntrack is None:
                log.warn("hoodyproxy client IP: the conntrack command is not installed; connection "
                         "tracking entries of stopped containers are not flushed")
            self._addresses = {c.id: c.address for c in self.directory.list() if c.running}
            self.directory.subscribe(self._container_changed)

    #: Leave the rules in place at stop: the next generation of the node (a binary
    #: upgrade, hoodyproxy.upgrade) replaced them with its own, identical, and uses them.
    keep_rules = False

    def stopService(self):
        super().stopService()
        if not self.keep_rules:
            self.uninstall()
        if self._flushing:  # a conntrack run still going: the stop waits for it (bounded)
            return defer.DeferredList([p.done for p in list(self._flushing)])
        return None

    # -- connection tracking ------------------------------------------------------------

    def _container_changed(self, container_id: str) -> None:
        if not self.installed:
            return
        container = self.directory.lookup(container_id)
        old = self._addresses.pop(container_id, None)
        if container is not None and container.running:
            self._addresses[container_id] = container.address
            if old == container.address:
                return
        # A loopback container is reached without these rules: nothing of ours to flush.
        if old is not None and old not in self._addresses.values() and not _loopback(old):
            self.flush_conntrack(old)

    def flush_conntrack(self, address: str):
        """Delete the connection-tracking entries towards ``address`` (a child process: the
        reactor thread does not wait).  Returns a Deferred firing with its exit status."""
        if self.conntrack is None or self.reactor is None:
            return None
        process = _Conntrack(address)
        try:
            self.reactor.spawnProcess(process, self.conntrack, [self.conntrack, "-D", "-d", address],
                                      env=os.environ, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            log.warn("hoodyproxy client IP: cannot run {conntrack}: {error}", conntrack=self.conntrack,
                     error=str(e))
            return None
        self._flushing.add(process)
        process.done.addBoth(self._flushed, process)
        process.timeout = self.reactor.callLater(CONNTRACK_TIMEOUT, process.kill)
        return process.done

    def _flushed(self, status, process: "_Conntrack"):
        self._flushing.discard(process)
        if process.timeout is not None and process.timeout.active():
            process.timeout.cancel()
        # 1: there was nothing to delete.
        if status not in (0, 1):
            log.warn("hoodyproxy client IP: conntrack -D -d {address} failed ({status}): {err}",
                     address=process.address, status=status,
                     err=process.err.decode("utf-8", "replace").strip()[:300])
        return status


def _shared(mangle) -> int:
    """How many other nodes share ``mangle``'s mark (0 for a stand-in that cannot tell)."""
    shared = getattr(mangle, "shared", None)
    return shared() if shared is not None else 0


class _Conntrack(protocol.ProcessProtocol):
    """One ``conntrack -D`` run: its stderr (bounded) and its exit status."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.err = b""
        self.done: defer.Deferred = defer.Deferred()
        self.timeout = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        if len(self.err) < 4096:
            self.err += data

    def processEnded(self, reason) -> None:
        status = getattr(reason.value, "exitCode", None)
        self.done.callback(status if status is not None else -1)

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass
