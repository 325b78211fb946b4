"""The node's limiters: the tables, the clock, and the checks the gateway calls.

One :class:`Limiters` per gateway (per worker process).  Checks run on the reactor
thread, cost O(1), and return the shared ``ALLOWED`` when the request is within its
limits, so the common path builds no object but the float it stores.

With ``shared`` and several workers, every table notes what it charged
(:mod:`hoodyproxy.limits._sharing`); :meth:`Limiters.drain_charges` and
:meth:`Limiters.apply_charges` are all the exchange among workers needs (which
:mod:`hoodyproxy.limits.shared` does, over a socket).  Checks stay local and synchronous.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable

from hoodyproxy.limits._keys import address_key, username_key
from hoodyproxy.limits._rates import Limit
from hoodyproxy.limits._settings import DEFAULT_SETTINGS, RateLimits, RateLimitSettings
from hoodyproxy.limits._sharing import MAX_BATCH_KEYS, Charges, SharedGcraTable, apply_charge
from hoodyproxy.limits._table import GcraTable, TableStats
from hoodyproxy.limits._verdict import ALLOWED, Verdict, over_limit

#: Bound on the cache of IPv6 address -> key.
_MAX_IPV6_KEYS = 4096
#: The longest delay assumed between a charge on one worker and its arrival on the
#: others, in sync intervals (at least a second): it sizes the debt a key may carry.
_LAG_INTERVALS = 20


class Limiters:
    """Every rate limit of one gateway process.

    ``clock`` is a callable returning seconds or an ``IReactorTime`` (its ``seconds``);
    by default ``time.monotonic``, which a wall-clock step cannot move backwards.
    ``workers`` is the number of worker processes.  Every worker enforces the full
    budgets; with ``settings.shared`` and ``workers > 1`` the tables also note what they
    charge (``sharing`` is True), for :meth:`drain_charges`.
    """

    def __init__(self, settings: RateLimitSettings = DEFAULT_SETTINGS,
                 clock: Callable[[], float] | Any = None, workers: int = 1) -> None:
        if clock is None:
            clock = time.monotonic
        self._now: Callable[[], float] = getattr(clock, "seconds", clock)
        self._ipv6_keys: dict[str, Hashable] = {}
        #: Whether the tables note their charges for the other workers (fixed at start:
        #: the exchange among workers is set up, or not, once).
        self.sharing = settings.shared and settings.enabled and workers > 1
        self._workers = workers
        self._lag = max(1.0, _LAG_INTERVALS * settings.shared_sync_ms / 1000)
        self._take_settings(settings)
        self._build_tables(settings.table_size)

    def _take_settings(self, settings: RateLimitSettings) -> None:
        self.settings = settings
        self._enabled = settings.enabled
        self._dry_run = settings.dry_run
        self._prefix = settings.ipv6_prefix
        self._per_address = settings.per_address
        self._failed_auth = settings.failed_auth
        self._failed_auth_user = settings.failed_auth_user

    def reconfigure(self, settings: RateLimitSettings) -> None:
        """Take the node's new ``[ratelimit]`` (a config reload) for the very next check.

        What each key has counted so far is kept, and judged by the new rates and bursts;
        a new ``table_size`` rebuilds the tables empty (every count starts over).
        ``shared`` and ``shared_sync_ms`` are kept as at start.
        """
        rebuild = settings.table_size != self.settings.table_size
        if settings.ipv6_prefix != self._prefix:
            self._ipv6_keys.clear()  # (IPv6 address -> key, by the old prefix)
        self._take_settings(settings)
        if rebuild:
            self._build_tables(settings.table_size)

    def _build_tables(self, size: int) -> None:
        workers, lag = self._workers, self._lag

        def table(name: str) -> GcraTable:
            return SharedGcraTable(name, size, workers, lag) if self.sharing else GcraTable(name, size)
        #: Before any credential: every request, per client address.
        self.address = table("address")
        #: Failed authentications per client address, and per username.
        self.auth_address = table("auth-address")
        self.auth_user = table("auth-user")
        #: After the decision, with the limits of the permission set that decided.
        self.client = table("client")
        self.principal = table("principal")
        self.container = table("container")
        self.project = table("project")
        self.program = table("program")
        self._by_name = {t.name: t for t in self.tables}

    @property
    def tables(self) -> tuple[GcraTable, ...]:
        return (self.address, self.auth_address, self.auth_user, self.client,
                self.principal, self.container, self.project, self.program)

    def stats(self) -> tuple[TableStats, ...]:
        """A snapshot of every table's counters and size, for metrics."""
        return tuple(table.stats() for table in self.tables)

    def drain_charges(self, max_keys: int = MAX_BATCH_KEYS) -> Charges:
        """What this worker charged since the last call: ``{table name: {key: (seconds,
        horizon)}}``, at most ``max_keys`` keys in all (shared fairly among the tables; the
        rest stay for the next call, merged with what comes meanwhile).  Empty unless
        ``sharing``."""
        waiting = [t for t in self.tables if getattr(t, "pending", None)]
        charges: Charges = {}
        budget = max_keys
        while waiting and budget > 0:
            share = max(1, budget // len(waiting))
            still = []
            for table in waiting:
                part = table.drain(min(share, budget))  # type: ignore[attr-defined]
                budget -= len(part)
                charges.setdefault(table.name, {}).update(part)  # type: ignore[arg-type]
                if table.pending:  # type: ignore[attr-defined]
                    still.append(table)
                if budget <= 0:
                    break
            waiting = still
        return charges

    def apply_charges(self, charges: Charges) -> None:
        """Count, now, what other workers charged (from their :meth:`drain_charges`).

        Applied charges are not noted again (nothing echoes); tables this process does
        not know are ignored.
        """
        if not self._enabled:
            return
        now = self._now()
        tables = self._by_name
        for name, entries in charges.items():
            table = tables.get(name)
            if table is None:
                continue
            for key, (cost, horizon) in entries.items():
                apply_charge(table, key, now, cost, horizon)

    def client_key(self, ip: str) -> Hashable:
        """The key of the client at ``ip`` (the TCP peer): IPv4, or its IPv6 network.

        IPv6 keys are remembered (a bounded cache, emptied when full): a client sends many
        requests, and parsing its address costs more than the rest of a check.
        """
        if ":" not in ip:
            return ip
        key = self._ipv6_keys.get(ip)
        if key is None:
            if len(self._ipv6_keys) >= _MAX_IPV6_KEYS:
                self._ipv6_keys.clear()
            key = self._ipv6_keys[ip] = address_key(ip, self._prefix)
        return key

    def check_client(self, ip: str) -> Verdict:
        """Count one request from ``ip``; first thing, before any credential is looked at."""
        if not self._enabled:
            return ALLOWED
        limit = self._per_address
        key = ip if ":" not in ip else self.client_key(ip)
        wait = self.address.take(key, self._now(), limit.interval, limit.tolerance)
        if not wait:
            return ALLOWED
        return self._over(self.address, limit, wait, self._dry_run)

    def check_failed_auth(self, ip: str, username: str | bytes | None = None) -> Verdict:
        """Whether ``ip`` (or ``username``) has failed too often to be checked now.

        Call it before verifying credentials (a hash, an LDAP bind, a JWT signature) and
        refuse when it says so; it counts nothing.  ``username`` is the Basic/LDAP user
        the request names, None for a token or a JWT.
        """
        if not self._enabled:
            return ALLOWED
        now = self._now()
        limit = self._failed_auth
        table = self.auth_address
        wait = table.peek(self.client_key(ip), now, limit.interval, limit.tolerance, capped=False)
        if username is not None:
            user_limit = self._failed_auth_user
            user_wait = self.auth_user.peek(username_key(username), now, user_limit.interval,
                                            user_limit.tolerance, capped=False)
            if user_wait > wait:
                table, wait, limit = self.auth_user, user_wait, user_limit
        if not wait:
            return ALLOWED
        table.refusals += 1
        return self._over(table, limit, wait, self._dry_run)

    def record_failed_auth(self, ip: str, username: str | bytes | None = None) -> None:
        """Count one failed authentication of ``ip`` (and of ``username``).

        Counted even over the limit, since guesses verified concurrently all passed
        :meth:`check_failed_auth` before the first one failed; the lockout that builds is
        at most twice the burst's refill time (four minutes at the defaults).
        """
        if not self._enabled:
            return
        now = self._now()
        limit = self._failed_auth
        self.auth_address.charge(self.client_key(ip), now, limit.interval, limit.ceiling)
        if username is not None:
            user_limit = self._failed_auth_user
            self.auth_user.charge(username_key(username), now, user_limit.interval, user_limit.ceiling)

    def check_after_decision(self, rate_limits: RateLimits | None, ip: str, principal: Hashable | None,
                             project: str, container: str, program: str | None = None,
                             index: int | None = None) -> Verdict:
        """Count one request the permission decision let through, against its set's limits.

        ``rate_limits`` are those of the effective permission set (None: none);
        ``principal`` identifies the credential that matched, unique across sets (for
        instance ``(set id, group, credential id)``), None when none did (the per-principal
        limit is then skipped); ``program`` and ``index`` name the service (for
        ``per_program``).  Either every limit counts the request or none does: a request
        refused by one limit costs nothing of the others' budgets, and the verdict names
        the limit with the longest wait.
        """
        if rate_limits is None or rate_limits.empty or not self._enabled:
            return ALLOWED
        # Unrolled in the order of _checks(), which the slow path uses: no list, no tuple
        # but the keys, on the common path.
        now = self._now()
        taken = 0
        limit = rate_limits.per_client
        if limit is not None:
            if self.client.take((container, self.client_key(ip)), now, limit.interval, limit.tolerance):
                return self._over_after(rate_limits, ip, principal, project, container, program, index,
                                        now, taken)
            taken += 1
        limit = rate_limits.per_principal
        if limit is not None and principal is not None:
            if self.principal.take(principal, now, limit.interval, limit.tolerance):
                return self._over_after(rate_limits, ip, principal, project, container, program, index,
                                        now, taken)
            taken += 1
        limit = rate_limits.per_container
        if limit is not None:
            if self.container.take(container, now, limit.interval, limit.tolerance):
                return self._over_after(rate_limits, ip, principal, project, container, program, index,
                                        now, taken)
            taken += 1
        limit = rate_limits.per_project
        if limit is not None:
            if self.project.take(project, now, limit.interval, limit.tolerance):
                return self._over_after(rate_limits, ip, principal, project, container, program, index,
                                        now, taken)
            taken += 1
        if rate_limits.programs:
            entry = rate_limits.program_limit(program, index)
            if entry is not None:
                limit = entry[1]
                if self.program.take((container, entry[0]), now, limit.interval, limit.tolerance):
                    return self._over_after(rate_limits, ip, principal, project, container, program, index,
                                            now, taken)
        return ALLOWED

    def _checks(self, rate_limits: RateLimits, ip: str, principal: Hashable | None, project: str,
                container: str, program: str | None, index: int | None,
                ) -> list[tuple[GcraTable, Hashable, Limit]]:
        """The limits a request counts against, in order: (table, key, limit)."""
        checks: list[tuple[GcraTable, Hashable, Limit | None]] = [
            (self.client, (container, self.client_key(ip)), rate_limits.per_client),
            (self.principal, principal, rate_limits.per_principal if principal is not None else None),
            (self.container, container, rate_limits.per_container),
            (self.project, project, rate_limits.per_project),
        ]
        entry = rate_limits.program_limit(program, index)
        if entry is not None:
            checks.append((self.program, (container, entry[0]), entry[1]))
        return [(table, key, limit) for table, key, limit in checks if limit is not None]

    def _over_after(self, rate_limits: RateLimits, ip: str, principal: Hashable | None, project: str,
                    container: str, program: str | None, index: int | None,
                    now: float, taken: int) -> Verdict:
        """The slow path of :meth:`check_after_decision`: the limit after ``taken`` others refused.

        Refused: give back what the ``taken`` limits before it counted, and name the limit
        with the longest wait among it and those after it.  Dry run: the request passes, so
        it counts against the limits after it as well; the verdict names the first over.
        """
        checks = self._checks(rate_limits, ip, principal, project, container, program, index)
        table, key, limit = checks[taken]
        wait = table.peek(key, now, limit.interval, limit.tolerance)  # take() counted the refusal
        if rate_limits.dry_run or self._dry_run:
            table.dry_run += 1
            for other, other_key, other_limit in checks[taken + 1:]:
                if other.take(other_key, now, other_limit.interval, other_limit.tolerance):
                    other.dry_run += 1
            return over_limit(table.name, wait, limit.burst, limit.window, True)
        for other, other_key, other_limit in checks[:taken]:
            other.refund(other_key, other_limit.interval)
        for other, other_key, other_limit in checks[taken + 1:]:
            other_wait = other.peek(other_key, now, other_limit.interval, other_limit.tolerance)
            if other_wait > wait:
                table, limit, wait = other, other_limit, other_wait
        return over_limit(table.name, wait, limit.burst, limit.window, False)

    def _over(self, table: GcraTable, limit: Limit, wait: float, dry_run: bool) -> Verdict:
        if dry_run:
            table.dry_run += 1
        return over_limit(table.name, wait, limit.burst, limit.window, dry_run)
