"""``<data-dir>/admin.json``: where a running node's admin API and admin token are.

A node started with ``--data-dir ./data`` listens for its admin API on an address of its
config and keeps its token in ``./data/admin-token``; the ``hoodyproxy`` command, run in
another terminal, knows neither.  So the node writes, once its ports are bound::

    {"url": "http://127.0.0.1:8081",                the admin API, as a client reaches it
     "token_file": "/abs/path/data/admin-token",    null when the token is in the config
     "node": "node-local", "pid": 12345}

(mode 0600, atomically: a temporary name, fsync, rename).  It is left in place at
stop, like the token file: a later start rewrites it, and a command that finds its
``url`` dead says the node may have stopped.  :func:`publish_admin_api`, called from the
node's ``startService``, writes it.

The ``hoodyproxy`` command finds a node with :func:`find_data_dir`, :func:`find_url`
and :func:`find_token`: an option wins over the environment, the environment over what
is found on disk.

- The data directory: ``--data-dir``; ``$HOODYPROXY_DATA_DIR``; ``./data`` if it holds
  an ``admin.json`` (``make run ARGS='--data-dir ./data'`` in this directory); the
  default one (:func:`hoodyproxy.config.default_data_dir`).
- The API: ``--admin-url``; the ``url`` of ``--data-dir``'s ``admin.json``;
  ``$HOODYPROXY_ADMIN_URL``; the ``url`` of the data directory's ``admin.json``;
  ``http://127.0.0.1:8081``.
- The token: ``--token``; ``--data-dir``'s token file; ``$HOODYPROXY_ADMIN_TOKEN``; the
  data directory's token file (the one its ``admin.json`` names, else ``admin-token``).

That side needs the standard library only: the command imports no Twisted.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

ADMIN_FILE = "admin.json"
TOKEN_FILE = "admin-token"
DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
URL_ENV = "HOODYPROXY_ADMIN_URL"
TOKEN_ENV = "HOODYPROXY_ADMIN_TOKEN"
DATA_DIR_ENV = "HOODYPROXY_DATA_DIR"
#: Where ``make run ARGS='--data-dir ./data'`` keeps a node's state, relative to the checkout.
LOCAL_DATA_DIR = "data"


class BadAdminFile(ValueError):
    """An ``admin.json`` that cannot be used; the message says why (not what it held)."""


class NoAdminAccess(Exception):
    """No admin API or no token can be found; the message says why and what to give."""


def admin_url_for(host: str, port: int) -> str:
    """The URL a local client reaches a listener bound to ``host``:``port`` by.

    A wildcard address (``0.0.0.0``, ``::``) is reached on loopback; an IPv6 address is
    bracketed.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}"


def admin_document(url: str, token_file: str | None, node: str, pid: int) -> dict[str, Any]:
    """What ``admin.json`` holds (``token_file`` absolute, or None for a token from the config)."""
    return {"url": url, "token_file": os.path.abspath(token_file) if token_file else None,
            "node": node, "pid": pid}


def read_admin_file(data_dir: str) -> dict[str, Any] | None:
    """``<data_dir>/admin.json`` as written by a node, or None if there is none.

    ``token_file``, if relative, is made relative to the data directory.  Raises
    BadAdminFile when the file exists but is not readable or not such a document.
    """
    path = os.path.join(data_dir, ADMIN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise BadAdminFile(f"cannot read {path} ({why})") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise BadAdminFile(f"{path} is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("url"), str) \
            or not isinstance(document.get("token_file"), (str, type(None))):
        raise BadAdminFile(f"{path} does not have a 'url' and a 'token_file'")
    token_file = document["token_file"]
    if token_file is not None and not os.path.isabs(token_file):
        document["token_file"] = os.path.join(data_dir, token_file)
    return document


# -- the command's side ---------------------------------------------------------------------

@dataclass(frozen=True)
class DataDir:
    """A node's data directory as the command found it: where, how, and its ``admin.json``."""

    path: str
    how: str                            # "--data-dir", "the default data directory"...
    admin: dict[str, Any] | None        # its admin.json, if a node wrote one

    @property
    def admin_file(self) -> str:
        return os.path.join(self.path, ADMIN_FILE)

    def token_file(self) -> tuple[str | None, str]:
        """(the token file, how it was found); None when the node's token is in its config."""
        if self.admin is not None:
            return self.admin["token_file"], f"from {self.admin_file}"
        return os.path.join(self.path, TOKEN_FILE), f"from {self.how}"


def find_data_dir(given: str | None, environ: Mapping[str, str] = os.environ) -> DataDir:
    """``given`` (``--data-dir``), else ``$HOODYPROXY_DATA_DIR``, else ``./data`` if it has
    an ``admin.json``, else the default data directory; with its ``admin.json`` read."""
    if given is not None:
        path, how = given, "--data-dir"
    elif environ.get(DATA_DIR_ENV):
        path, how = environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    elif os.path.isfile(os.path.join(LOCAL_DATA_DIR, ADMIN_FILE)):
        path, how = os.path.join(".", LOCAL_DATA_DIR), f"./{LOCAL_DATA_DIR} in the current directory"
    else:
        from hoodyproxy.config import default_data_dir
        path, how = default_data_dir(), "the default data directory"
    try:
        admin = read_admin_file(path)
    except BadAdminFile as e:
        raise NoAdminAccess(f"{e}; give --admin-url and --token, or another --data-dir") from None
    return DataDir(path, how, admin)


def find_url(given: str | None, data_dir_given: bool, data_dir: Callable[[], DataDir],
             environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(the admin API's URL, where it came from; None when given or the built-in default).

    ``given`` is ``--admin-url``; ``data_dir_given`` says whether ``--data-dir`` was;
    ``data_dir()`` is called only when the options and the environment leave it open.
    """
    if given:
        return given, None

    def from_admin_file() -> tuple[str, str] | None:
        found = data_dir()
        if found.admin is None:
            return None
        return found.admin["url"], f"from {found.admin_file}, which the node wrote at its start: is it still running?"

    if data_dir_given and (found := from_admin_file()) is not None:
        return found
    if environ.get(URL_ENV):
        return environ[URL_ENV], f"from ${URL_ENV}"
    return from_admin_file() or (DEFAULT_ADMIN_URL, None)


def find_token(given: str | None, data_dir_given: bool, data_dir: Callable[[], DataDir],
               environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(the admin token, where it came from: ``--token``, ``$HOODYPROXY_ADMIN_TOKEN`` or a file).

    Raises NoAdminAccess when the file cannot be read, is empty, or the node's token is
    in its config (and so in no file).
    """
    if given:
        return given, "--token"
    if not data_dir_given and environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    found = data_dir()
    path, how = found.token_file()
    if path is None:
        raise NoAdminAccess(f"no admin token: the node of {found.path} takes it from its config "
                            f"([admin] token); give --token or ${TOKEN_ENV}")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not readable"
        raise NoAdminAccess(f"no admin token: cannot read {path} ({why}; {how}); "
                            f"give --token, ${TOKEN_ENV} or --data-dir") from None
    if not token:
        raise NoAdminAccess(f"no admin token: {path} is empty ({how}); give --token, ${TOKEN_ENV} or --data-dir")
    return token, f"{path}, {how}"


# -- the node's side ----------------------------------------------------------------------

def publish_admin_api(node: Any) -> str | None:
    """Write ``<data-dir>/admin.json`` for a started node; return its path (None if not written).

    Reads ``node.settings`` (``data_dir``, ``admin_token``, ``node``) and
    ``node.ports["admin"]`` (the bound listeners: the first is published).  Never
    fails the start: a file that cannot be written is a warning in the log.
    """
    from twisted.logger import Logger

    from hoodyproxy.tls.devca import write_atomic

    log = Logger()
    settings = node.settings
    ports: Sequence[Any] = node.ports.get("admin") or ()
    if not ports:
        return None
    bound = ports[0].getHost()
    token_file = None if settings.admin_token else os.path.join(settings.data_dir, TOKEN_FILE)
    document = admin_document(admin_url_for(bound.host, bound.port), token_file, settings.node, os.getpid())
    data = (json.dumps(document, indent=2) + "\n").encode()
    path = os.path.abspath(os.path.join(settings.data_dir, ADMIN_FILE))
    try:
        write_atomic(path, data, mode=0o600)
    except OSError as e:
        log.warn("hoodyproxy admin API: cannot write {path} ({why}); the hoodyproxy command will "
                 "need --admin-url and --token", path=path, why=e.strerror or e)
        return None
    log.info("hoodyproxy admin API: {url} (written to {path} for the hoodyproxy command)",
             url=document["url"], path=path)
    return path
