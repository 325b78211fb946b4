"""Every plugin interface of hoodyproxy, in one place: the extension points.

Third parties provide these with ``zope.interface.implementer`` and make them findable
with :func:`twisted.plugin.getPlugins` (drop a module in a ``hoodyproxy/plugins``
directory on ``sys.path``).  :mod:`hoodyproxy.testing` ships a ``verifyObject`` test
mixin for each.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IContainerDirectory(Interface):
    """The live container map: container id -> project, address, state, port overrides."""

    def lookup(container_id):
        """Return the :class:`hoodyproxy.directory.Container` for ``container_id`` or None.

        Called on every request: must answer from memory, without blocking I/O.
        """

    def put(container):
        """Create or replace a container; durable when it returns.  ``container.source``
        says who owns the entry (``admin``, ``docker``); see docs/docker.rst."""

    def delete(container_id):
        """Remove a container; return True if it existed; durable when it returns."""

    def list(project=None):
        """All containers, or those of one project, ordered by id."""

    def subscribe(callback):
        """Call ``callback(container_id)`` after a container changes or goes away."""


class IServiceKind(Interface):
    """A service kind: how a program's requests are classified into capabilities and levels.

    The access layer uses ``name``, ``classify(method, path, websocket)`` and, if present,
    ``levels`` (see :mod:`hoodyproxy.access.capabilities`).  A kind that decides by method
    or path should also say so, so that the gateway can refuse requests a container might
    read as more than they were classified (see :mod:`hoodyproxy.access.ambiguity`):
    ``strictest`` (the (capability, level) a request of unknown meaning needs),
    ``low_methods`` (methods it classifies low by method alone) and ``decisive_paths``
    (paths whose classification differs from the rest).
    """

    name = Attribute("the kind's name, as a program's ``kind`` says it")

    def port_for(index):
        """The container port for this index, or raise IndexOutOfRange (kept for plugins
        written against the first version of this interface; the access layer does not
        call it)."""


class IAuditSink(Interface):
    """Where audit records go: one call per finished exchange."""

    def record(entry):
        """Receive one audit record (a dict of JSON-serialisable values)."""


class ICertificateSource(Interface):
    """Where the TLS certificates a node serves come from (files, generated, ACME)."""

    def certificates():
        """Iterate over (hostnames, cert_path, key_path) to serve."""


class IGroupType(Interface):
    """A kind of permission group: how a request's credentials are checked against it.

    Found by ``type`` name (``ip``, ``token``, ``password``, ``jwt``, ``ldap`` ship with
    hoodyproxy).  A provider that raises in ``check`` is logged and counts as no match.
    """

    name = Attribute("the group's 'type' string in a permission set, e.g. 'ip'")
    challenge = Attribute("'basic', 'bearer' or None: which WWW-Authenticate challenge "
                          "a request without credentials gets when this group could have let it in")

    def parse(spec, field):
        """Validate a group object from the admin API and return its stored form.

        ``field`` is the path to name in errors (``groups.office``).  Raise
        :class:`hoodyproxy.access.InvalidPermissions` naming the bad field.  Secrets that
        only need checking are hashed here (passwords, tokens); the stored form is a
        JSON-serialisable dict that ``parse`` accepts again unchanged (a PATCH re-reads
        stored groups).
        """

    def redact(stored):
        """The stored form as the admin API shows it: no secret, no hash."""

    def check(stored, credentials):
        """True if ``credentials`` (:class:`hoodyproxy.access.Credentials`) satisfy the group.

        May return a Deferred firing with a bool (JWKS fetch, LDAP bind).  Never blocks
        the reactor.
        """
