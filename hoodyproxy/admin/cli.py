"""``hoodyproxy``: a command-line client of the admin API (stdlib only: argparse and urllib).

::

    hoodyproxy projects proxy permissions replace --project P \\
        --groups office='{"type":"ip","range":"203.0.113.0/24"}' \\
        --permissions office='{"terminal":true,"files":true,"display":true}' --default deny
    hoodyproxy containers proxy permissions get --container C
    hoodyproxy projects proxy rate-limits replace --project P --per-client 100/s:200 \\
        --per-program terminal=10/s:20
    hoodyproxy containers proxy rate-limits patch --container C --remove per-client
    hoodyproxy containers put --container C --project P --address 10.0.0.7
    hoodyproxy containers list --project P
    hoodyproxy proxy create --container-id C --alias my-api --program http --index 3000
    hoodyproxy proxy domains add --alias my-api --domain api.yourcompany.com
    hoodyproxy tap --container C --path /api/ --status 5xx --bodies 4096 --har errors.har
    hoodyproxy reload

Where it connects (:func:`connect`): ``--admin-url``, ``--token``, ``--data-dir``, the
environment, and the ``admin.json`` a running node writes into its data directory, in
the order :mod:`hoodyproxy.admin.discovery` gives.  A 401 says which token was sent and
how to point elsewhere; an unreachable URL read from an ``admin.json`` names that file.

The answer's JSON is printed on stdout, indented; its ``warnings`` (a weak token, an
alias index that is probably not a port...) also on stderr, one line each.  Exit status:
0 on a 2xx; 1 when the API answers an error (its message on stderr, one line:
``hoodyproxy: 422 groups.office.range: ...``); 2 on a usage error or when the API cannot
be reached.  No reactor is involved: one blocking request per run.

``tap`` keeps its request open and shows the events as they come
(:mod:`hoodyproxy.admin.tapview`) until the tap ends, the node closes the stream, or
Ctrl-C: exit 0 in each case, with the ``--har`` file written; a connection lost midway is
exit 2, the HAR of what came still written.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import math
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NoReturn, Sequence

from hoodyproxy.admin.discovery import (ADMIN_FILE, DATA_DIR_ENV, DEFAULT_ADMIN_URL, LOCAL_DATA_DIR, TOKEN_ENV,
                                        TOKEN_FILE, URL_ENV, NoAdminAccess, find_data_dir, find_token, find_url)
from hoodyproxy.admin.tapview import TapOutput, printable, read_lines

PROG = "hoodyproxy"
ID = re.compile(r"[0-9a-f]{24}\Z")

EXIT_OK, EXIT_API_ERROR, EXIT_USAGE = 0, 1, 2


class Failed(Exception):
    """Stop with ``status`` after printing ``message`` (one line) to stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- argument types -----------------------------------------------------------------------

def _id(value: str) -> str:
    if not ID.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an id (24 lowercase hexadecimal digits)")
    return value


def _name_json(value: str) -> tuple[str, Any]:
    """``NAME=JSON`` (or ``NAME=@FILE``, the JSON read from FILE) as (name, parsed value)."""
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not NAME=JSON")
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{name}: cannot read {text[1:]!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"{name}: {text[1:]!r} is not UTF-8 text") from None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f" ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise argparse.ArgumentTypeError(f"{name}: the value is not valid JSON{where}") from None
    return name, parsed


def _port(value: str) -> tuple[str, int]:
    """``PROGRAM=PORT`` (``terminal=7681``, ``http-80=8080``) as (key, port)."""
    key, sep, text = value.partition("=")
    if not sep or not key or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not PROGRAM=PORT "
                                         f"(a port from 1 to 65535)")
    return key, int(text)


# -- the parser ---------------------------------------------------------------------------

def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options naming the API and the token (accepted before or after the command)."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("admin API")
    group.add_argument("--admin-url", metavar="URL", default=default,
                       help=f"the admin API (default: the url of --data-dir's {ADMIN_FILE}, else ${URL_ENV}, "
                            f"else the data directory's {ADMIN_FILE}, else {DEFAULT_ADMIN_URL})")
    group.add_argument("--token", metavar="TOKEN", default=default,
                       help=f"the admin token (default: --data-dir's token file if given, else ${TOKEN_ENV}, "
                            f"else the data directory's token file)")
    group.add_argument("--data-dir", metavar="DIR", default=default,
                       help=f"the node's data directory (its --data-dir), where a running node's "
                            f"{ADMIN_FILE} and {TOKEN_FILE} are (default: ${DATA_DIR_ENV}, else "
                            f"./{LOCAL_DATA_DIR} if it has an {ADMIN_FILE}, else /var/lib/hoodyproxy "
                            f"as root, else ~/.local/share/hoodyproxy)")
    group.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS if suppress else 30.0,
                       help="give up on the API after this many seconds (default 30)")


def _leaf(subparsers, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler, parser=parser)
    return parser


def _limit(value: str) -> dict[str, Any]:
    """``RATE:BURST`` (``100/s:200``, ``6000/min:100``) as the API's ``{"rate", "burst"}``;
    the API validates the rate."""
    rate, sep, burst = value.rpartition(":")
    if not sep or not rate or not burst.isdigit():
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not RATE:BURST (e.g. 100/s:200)")
    return {"rate": rate, "burst": int(burst)}


def _program_limit(value: str) -> tuple[str, dict[str, Any]]:
    """``PROGRAM=RATE:BURST`` (``terminal=10/s:20``, ``http-3000=100/s:200``) as (key, limit)."""
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not PROGRAM=RATE:BURST "
                                         f"(e.g. terminal=10/s:20)")
    return key, _limit(text)


def _proxy_settings_commands(subparsers, scope: str) -> None:
    """``proxy {permissions,rate-limits} ...`` under ``subparsers`` (of projects or containers)."""
    proxy = subparsers.add_parser("proxy", help=f"the gateway's settings for a {scope}").add_subparsers(
        dest="proxy_what", metavar="{permissions,rate-limits}", required=True)
    _permission_commands(proxy, scope)
    _rate_limit_commands(proxy, scope)


def _scope_options(p: argparse.ArgumentParser, scope: str, project_required: bool) -> None:
    if scope == "container":
        p.add_argument("--container", metavar="C", type=_id, required=True, help="the container id")
        p.add_argument("--project", metavar="P", type=_id, required=project_required,
                       help="the container's project id" + (" (required)" if project_required else ""))
    else:
        p.add_argument("--project", metavar="P", type=_id, required=True, help="the project id")


def _setting_actions(proxy, setting: str, help_text: str, scope: str, helps: dict[str, str], make_body,
                     project_required: bool) -> list[tuple[str, argparse.ArgumentParser]]:
    """``SETTING {replace,patch,get,delete}`` under ``proxy``: PUT, PATCH, GET and DELETE of
    ``/api/v1/{projects,containers}/{id}/proxy/SETTING``, the body from ``make_body``."""
    actions = proxy.add_parser(setting, help=help_text).add_subparsers(
        dest="action", metavar="{replace,patch,get,delete}", required=True)
    handlers = {"replace": _setting_replace, "patch": _setting_patch, "get": _setting_get,
                "delete": _setting_delete}
    leaves = []
    for action, handler in handlers.items():
        p = _leaf(actions, action, helps[action], handler)
        p.set_defaults(scope=scope, setting=setting, make_body=make_body)
        _scope_options(p, scope, project_required=project_required and action == "replace")
        leaves.append((action, p))
    return leaves


def _permission_commands(proxy, scope: str) -> None:
    """``permissions {replace,patch,get,delete}`` under ``proxy`` (of projects or containers)."""
    where = f"the {scope}-level permission set"
    helps = {
        "replace": f"create or replace {where} (PUT)",
        "patch": f"change {where} by name (PATCH): groups and permissions given are set, others kept",
        "get": f"show {where}, secrets redacted (GET)",
        "delete": f"remove {where} (DELETE)",
    }
    for action, p in _setting_actions(proxy, "permissions", f"the {scope}'s permission set", scope, helps,
                                      _permissions_body, project_required=True):
        if action in ("replace", "patch"):
            p.add_argument("--groups", metavar="NAME=JSON", type=_name_json, action="append", default=[],
                           help='a group, e.g. office=\'{"type":"ip","range":"203.0.113.0/24"}\' '
                                "(NAME=@FILE reads the JSON from FILE); repeatable")
            p.add_argument("--permissions", metavar="NAME=JSON", type=_name_json, action="append", default=[],
                           help='what a group may do, e.g. office=\'{"terminal":true,"files":"read"}\'; '
                                "repeatable")
            p.add_argument("--default", choices=("allow", "deny"),
                           help="what a request no group allows gets" + (" (default deny)" if action == "replace" else ""))
        if action == "patch":
            p.add_argument("--remove-group", metavar="NAME", action="append", default=[],
                           help="delete this group (sent as null); repeatable")
            p.add_argument("--remove-permissions", metavar="NAME", action="append", default=[],
                           help="delete this group's permissions (sent as null); repeatable")
        _connection_options(p, suppress=True)


#: The limits of a rate-limit entry: (option, the API's key, what it counts).
LIMIT_OPTIONS = (("--per-client", "per_client", "requests per client address, on each container, e.g. "
                                                 "100/s:200 (rates: 100/s, 6000/min, 1000/h, 5/d)"),
                 ("--per-principal", "per_principal", "requests per credential that matched (a Basic or LDAP "
                                                       "user, a token, a JWT sub), e.g. 10/s:20"),
                 ("--per-container", "per_container", "all requests to a container, e.g. 1000/s:2000"),
                 ("--per-project", "per_project", "all requests to the project's containers, e.g. 5000/s:10000"))
REMOVABLE_LIMITS = tuple(option[2:] for option, _, _ in LIMIT_OPTIONS) + ("per-program",)


def _rate_limit_commands(proxy, scope: str) -> None:
    """``rate-limits {replace,patch,get,delete}`` under ``proxy`` (of projects or containers)."""
    where = f"the {scope}'s rate limits"
    helps = {
        "replace": f"create or replace {where} (PUT): limits not given are none",
        "patch": f"change {where} (PATCH): limits given are set, others kept",
        "get": f"show {where} (GET)",
        "delete": f"remove {where} (DELETE)",
    }
    for action, p in _setting_actions(proxy, "rate-limits", where, scope, helps, _rate_limits_body,
                                      project_required=False):
        if action in ("replace", "patch"):
            for option, _, counts in LIMIT_OPTIONS:
                p.add_argument(option, metavar="RATE:BURST", type=_limit, help=counts)
            p.add_argument("--per-program", metavar="PROGRAM=RATE:BURST", type=_program_limit, action="append",
                           default=[], help="requests to one program of a container (every index, or one: "
                                            "http-3000), e.g. terminal=10/s:20; repeatable")
            p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=None,
                           help="over-limit requests pass and are only audited" +
                                (" (default --no-dry-run)" if action == "replace" else ""))
        if action == "patch":
            p.add_argument("--remove", metavar="LIMIT", choices=REMOVABLE_LIMITS, action="append", default=[],
                           help="remove a limit (sent as null): " + ", ".join(REMOVABLE_LIMITS) +
                                " (every program's); repeatable")
            p.add_argument("--remove-program", metavar="PROGRAM", action="append", default=[],
                           help="remove one program's limit (sent as null); repeatable")
        _connection_options(p, suppress=True)


def build_parser() -> argparse.ArgumentParser:
    from hoodyproxy import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Talk to a hoodyproxy node's admin API.",
        epilog="Exit status: 0 on success, 1 when the API answers an error, 2 on a usage error "
               "or when the API cannot be reached.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_options(parser, suppress=False)
    top = parser.add_subparsers(dest="command", metavar="{projects,containers,proxy,tap,reload}", required=True)

    projects = top.add_parser("projects", help="project-level settings")
    _proxy_settings_commands(projects.add_subparsers(dest="project_command", metavar="proxy", required=True),
                             "project")

    containers = top.add_parser("containers", help="the live container map, and container-level settings")
    sub = containers.add_subparsers(dest="container_command", metavar="{put,get,delete,list,proxy}",
                                    required=True)
    p = _leaf(sub, "put", "register or replace a container in the live map (PUT)", _container_put)
    p.add_argument("--container", metavar="C", type=_id, required=True, help="the container id")
    p.add_argument("--project", metavar="P", type=_id, required=True, help="its project id")
    p.add_argument("--address", metavar="A", required=True, help="its IPv4 or IPv6 address")
    p.add_argument("--state", choices=("running", "stopped"), help="default running")
    p.add_argument("--port", metavar="PROGRAM=PORT", type=_port, action="append", default=[],
                   help="a port override, e.g. terminal=7681 or http-80=8080; repeatable")
    p.add_argument("--force", action="store_true",
                   help="replace an entry the Docker provider owns (it becomes the admin's)")
    _connection_options(p, suppress=True)
    for name, help_text, handler in (("get", "show a container (GET)", _container_get),
                                     ("delete", "remove a container from the live map (DELETE)", _container_delete)):
        p = _leaf(sub, name, help_text, handler)
        p.add_argument("--container", metavar="C", type=_id, required=True, help="the container id")
        if name == "delete":
            p.add_argument("--force", action="store_true", help="remove an entry the Docker provider owns")
        _connection_options(p, suppress=True)
    p = _leaf(sub, "list", "list the containers, optionally one project's (GET)", _container_list)
    p.add_argument("--project", metavar="P", type=_id, help="only this project's")
    _connection_options(p, suppress=True)
    _proxy_settings_commands(sub, "container")
    _proxy_commands(top)
    _tap_command(top)
    p = _leaf(top, "reload", "read the node's config file again and apply what can change live, as "
                             "SIGHUP does; prints the keys changed and those needing a restart (POST)",
              _reload)
    _connection_options(p, suppress=True)
    return parser


def _alias_name(value: str) -> str:
    # A light check so a path never carries '/' or '?'; the API validates the rest.
    if not value or any(c in value for c in "/?#%") or value in (".", ".."):
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not an alias")
    return value


def _domain_name(value: str) -> str:
    if not value or any(c in value for c in "/?#%") or value in (".", ".."):
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not a domain name")
    return value


def _proxy_commands(top) -> None:
    """``proxy {create,list,delete}`` and ``proxy domains {add,list,delete}``: aliases and domains."""
    proxy = top.add_parser("proxy", help="aliases (<alias>.<node>.<zone>) and their custom domains")
    sub = proxy.add_subparsers(dest="proxy_command", metavar="{create,list,get,delete,domains}", required=True)
    p = _leaf(sub, "create", "create an alias routing to a container's program and index (POST)", _alias_create)
    p.add_argument("--container-id", metavar="C", type=_id, required=True, help="the container id")
    p.add_argument("--alias", metavar="A", type=_alias_name, required=True,
                   help="one lowercase DNS label, e.g. my-api")
    p.add_argument("--program", metavar="P", required=True, help="the program, e.g. http or terminal")
    p.add_argument("--index", metavar="N", type=int, required=True,
                   help="the port (http) or instance (terminal, display...)")
    _connection_options(p, suppress=True)
    p = _leaf(sub, "list", "list the aliases, optionally one container's (GET)", _alias_list)
    p.add_argument("--container-id", metavar="C", type=_id, help="only this container's")
    _connection_options(p, suppress=True)
    for name, help_text, handler in (("get", "show an alias and its domains (GET)", _alias_get),
                                     ("delete", "delete an alias and detach its domains (DELETE)", _alias_delete)):
        p = _leaf(sub, name, help_text, handler)
        p.add_argument("--alias", metavar="A", type=_alias_name, required=True, help="the alias")
        _connection_options(p, suppress=True)
    domains = sub.add_parser("domains", help="custom domains attached to an alias").add_subparsers(
        dest="domains_command", metavar="{add,list,delete}", required=True)
    for name, help_text, handler in (
            ("add", "attach a custom domain (a CNAME to the alias's hostname) to an alias (POST)", _domain_add),
            ("list", "list an alias's custom domains (GET)", _domain_list),
            ("delete", "detach a custom domain from an alias (DELETE)", _domain_delete)):
        p = _leaf(domains, name, help_text, handler)
        p.add_argument("--alias", metavar="A", type=_alias_name, required=True, help="the alias")
        if name != "list":
            p.add_argument("--domain", metavar="D", type=_domain_name, required=True,
                           help="the custom domain, e.g. api.yourcompany.com")
        _connection_options(p, suppress=True)


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not a whole number of 0 or more")
    return int(value)


def _positive_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not a whole number of 1 or more")
    return int(value)


def _seconds(value: str) -> int | float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not a number of seconds more than 0")
    return int(seconds) if seconds.is_integer() else seconds


STATUS = re.compile(r"[1-5]([0-9][0-9]|xx)\Z")
METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token


def _comma_list(pattern: re.Pattern, normalize, what: str):
    """An argument type: one item or several with commas, each normalized and matching ``pattern``."""
    def parse(value: str) -> list[str]:
        items = [normalize(item.strip()) for item in value.split(",")]
        for item in items:
            if not pattern.match(item):
                raise argparse.ArgumentTypeError(f"{_one_line(item)[:80]!r} is not {what}")
        return items
    return parse


_statuses = _comma_list(STATUS, str.lower, "a status (404) or a class (2xx)")  # 2xx, 404, 2xx,404
_methods = _comma_list(METHOD, str.upper, "a method")  # GET, GET,POST


def _header_match(value: str) -> dict[str, str]:
    """``NAME`` (the header is there) or ``NAME=VALUE`` (with this value)."""
    name, sep, text = value.partition("=")
    if not METHOD.match(name):  # a header name is a token too
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not NAME or NAME=VALUE")
    return {"name": name, "value": text} if sep else {"name": name}


def _path_prefix(value: str) -> str:
    if not value.startswith("/") or not value.isprintable():
        raise argparse.ArgumentTypeError(f"{_one_line(value)[:80]!r} is not a path prefix starting with /")
    return value


def _tap_command(top) -> None:
    """``tap``: watch the exchanges a match selects, as they finish (``POST /api/v1/taps``)."""
    p = _leaf(top, "tap", "watch live exchanges through the gateway: one line per request, raw JSON "
                          "events, or a HAR file (POST /api/v1/taps)", _tap)
    match = p.add_argument_group("what to watch (every option given must match; none: everything)")
    match.add_argument("--project", metavar="P", type=_id, help="this project's containers")
    match.add_argument("--container", metavar="C", type=_id, help="this container")
    match.add_argument("--program", metavar="NAME", help="this program (http, terminal, ...)")
    match.add_argument("--index", metavar="N", type=int, help="this index (the port of http)")
    match.add_argument("--host", metavar="H", type=_domain_name, help="requests for this host name")
    match.add_argument("--alias", metavar="A", type=_alias_name, help="requests through this alias")
    match.add_argument("--path", metavar="PREFIX", type=_path_prefix, help="paths starting with PREFIX, e.g. /api/")
    match.add_argument("--method", metavar="M", type=_methods, action="append", default=[],
                       help="this method (GET,POST for several); repeatable")
    match.add_argument("--status", metavar="STATUS", type=_statuses, action="append", default=[],
                       help="answers with this status (404) or class (2xx); 2xx,404 for several; repeatable")
    match.add_argument("--ws-only", action="store_true", help="WebSocket exchanges only")
    match.add_argument("--header", metavar="NAME[=VALUE]", type=_header_match, action="append", default=[],
                       help="requests with this header (and this value); one --header")
    capture = p.add_argument_group("what to capture")
    capture.add_argument("--bodies", metavar="N", type=_count,
                         help="capture up to N bytes of each request and response body (default: the node's)")
    capture.add_argument("--no-headers", action="store_true", help="do not capture headers")
    capture.add_argument("--ws", action="store_true",
                         help="capture WebSocket frames, and show one line for each")
    capture.add_argument("--ws-bytes", metavar="N", type=_count,
                         help="capture up to N bytes of each frame (default: the node's)")
    tap = p.add_argument_group("the tap")
    tap.add_argument("--ttl", metavar="SECONDS", type=_seconds,
                     help="end the tap after this long (default: the node's)")
    tap.add_argument("--max-events", metavar="N", type=_positive_count, help="end the tap after N events")
    tap.add_argument("--no-redact", action="store_true",
                     help="ask the node not to redact credentials (Authorization, Cookie...)")
    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the events as the node sends them, "
                                                            "one JSON object a line")
    output.add_argument("--har", metavar="FILE", help="when the tap ends (or on Ctrl-C), write the exchanges "
                                                      "to FILE as a HAR 1.2 log")
    _connection_options(p, suppress=True)


# -- the commands -------------------------------------------------------------------------

def _named(parser: argparse.ArgumentParser, option: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for name, value in pairs:
        if name in named:
            parser.error(f"argument {option}: {name} is given twice")
        named[name] = value
    return named


def _permissions_body(parser, args, patch: bool) -> dict[str, Any]:
    groups = _named(parser, "--groups", args.groups)
    permissions = _named(parser, "--permissions", args.permissions)
    if patch:
        for option, names, section in (("--remove-group", args.remove_group, groups),
                                       ("--remove-permissions", args.remove_permissions, permissions)):
            for name in names:
                if name in section:
                    parser.error(f"argument {option}: {name} is also given a value")
                section[name] = None
    body: dict[str, Any] = {}
    if args.scope == "container" and args.project is not None:
        body["project"] = args.project  # a project-level set's project is the URL's
    if groups or not patch:
        body["groups"] = groups
    if permissions or not patch:
        body["permissions"] = permissions
    if args.default is not None:
        body["default"] = args.default
    if not body:
        parser.error("nothing to change: give --groups, --permissions, --remove-group, "
                     "--remove-permissions or --default")
    return body


def _rate_limits_body(parser, args, patch: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.scope == "container" and args.project is not None:
        body["project"] = args.project  # a project's entry's project is the URL's
    for option, key, _ in LIMIT_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    programs = _named(parser, "--per-program", args.per_program)
    if patch:
        for name in args.remove:
            key = name.replace("-", "_")
            if key in body or (key == "per_program" and (programs or args.remove_program)):
                parser.error(f"argument --remove: {name} is also given a value")
            body[key] = None
        for name in args.remove_program:
            if name in programs:
                parser.error(f"argument --remove-program: {name} is also given a value")
            programs[name] = None
    if programs:
        body["per_program"] = programs
    if args.dry_run is not None:
        body["dry_run"] = args.dry_run
    if patch and not set(body) - {"project"}:
        parser.error("nothing to change: give --per-client, --per-principal, --per-container, "
                     "--per-project, --per-program, --dry-run/--no-dry-run, --remove or --remove-program")
    return body


def tap_body(parser: argparse.ArgumentParser, args) -> dict[str, Any]:
    """The ``POST /api/v1/taps`` body of ``hoodyproxy tap``'s options: ``match``, and
    ``capture``, ``ttl_s``, ``max_events``, ``redact`` with only what the options give."""
    match: dict[str, Any] = {key: getattr(args, key) for key in ("project", "container", "program", "index",
                                                                 "host", "alias")
                             if getattr(args, key) is not None}
    if args.path is not None:
        match["path_prefix"] = args.path
    if args.method:
        match["methods"] = list(dict.fromkeys(m for methods in args.method for m in methods))
    if args.status:
        match["status"] = list(dict.fromkeys(s for statuses in args.status for s in statuses))
    if args.ws_only:
        match["websocket_only"] = True
    if len(args.header) > 1:
        parser.error("argument --header: a tap matches one header; give --header once")
    if args.header:
        match["header"] = args.header[0]
    capture: dict[str, Any] = {}
    if args.no_headers:
        capture["headers"] = False
    if args.bodies is not None:
        capture["body_bytes"] = args.bodies
    if args.ws:
        capture["websocket"] = True
    if args.ws_bytes is not None:
        capture["websocket_bytes"] = args.ws_bytes
    body: dict[str, Any] = {"match": match}
    if capture:
        body["capture"] = capture
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    if args.max_events is not None:
        body["max_events"] = args.max_events
    if args.no_redact:
        body["redact"] = False
    return body


TAPS_PATH = "/api/v1/taps"
#: The longest event line read (an exchange with large captured bodies); a longer one is skipped.
MAX_EVENT_LINE = 64 << 20


def _tap(client, parser, args):
    """Open the tap, show its events until it ends, the node closes, or Ctrl-C; then the HAR."""
    body = tap_body(parser, args)
    if args.har is not None:
        directory = os.path.dirname(os.path.abspath(args.har))
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK)) or os.path.isdir(args.har):
            parser.error(f"argument --har: cannot write {args.har!r} (not a file in a writable directory)")
    har = None
    if args.har is not None:
        from hoodyproxy.observe.har import HarBuilder
        har = HarBuilder()
    output = TapOutput(sys.stdout, sys.stderr, raw=args.json, show_ws=args.ws, har=har, prefix=f"{PROG}: ")
    stream, lost = None, None
    try:
        stream = client.stream("POST", TAPS_PATH, body)  # an error answer raises Failed: no HAR then
        for line in read_lines(stream.readline, MAX_EVENT_LINE):
            event = output.handle(line)
            if event is not None and event.get("type") == "tap" and isinstance(event.get("ttl_s"), (int, float)):
                # The node ends the tap after ttl_s: until then a quiet tap is no dead node.
                stream.set_timeout(event["ttl_s"] + client.timeout)
            if output.end is not None:
                break
        else:
            if not args.json:
                output.note(f"tap {_tap_id(output)} closed by the node after {output.events} events")
    except KeyboardInterrupt:
        if not args.json:
            output.note(f"tap {_tap_id(output)} stopped (Ctrl-C) after {output.events} events")
    except StreamLost as gone:
        lost = client._unreachable(gone.error, "lost", stream.timeout if stream is not None else None)
    finally:
        if stream is not None:
            stream.close()
    if har is not None:
        try:
            entries = har.dump(args.har)
        except OSError as error:
            raise Failed(EXIT_USAGE, f"cannot write the HAR to {args.har}: {error.strerror or error}") from None
        output.note(f"wrote {entries} {'entry' if entries == 1 else 'entries'} to {args.har}")
    if lost is not None:
        raise lost
    return 200, None


def _tap_id(output: TapOutput) -> str:
    return printable((output.tap or {}).get("id", "?"))


def _setting_path(args) -> str:
    """``/api/v1/{projects,containers}/{id}/proxy/{permissions,rate-limits}``."""
    owner = f"containers/{args.container}" if args.scope == "container" else f"projects/{args.project}"
    return f"/api/v1/{owner}/proxy/{args.setting}"


def _setting_replace(client, parser, args):
    return client.request("PUT", _setting_path(args), args.make_body(parser, args, patch=False))


def _setting_patch(client, parser, args):
    return client.request("PATCH", _setting_path(args), args.make_body(parser, args, patch=True))


def _setting_get(client, parser, args):
    return client.request("GET", _setting_path(args))


def _setting_delete(client, parser, args):
    return client.request("DELETE", _setting_path(args))


def _container_put(client, parser, args):
    body: dict[str, Any] = {"project": args.project, "address": args.address}
    if args.state is not None:
        body["state"] = args.state
    if args.port:
        body["ports"] = _named(parser, "--port", args.port)
    return client.request("PUT", f"/api/v1/containers/{args.container}{_force(args)}", body)


def _force(args) -> str:
    return "?force=true" if args.force else ""


def _container_get(client, parser, args):
    return client.request("GET", f"/api/v1/containers/{args.container}")


def _container_delete(client, parser, args):
    return client.request("DELETE", f"/api/v1/containers/{args.container}{_force(args)}")


def _container_list(client, parser, args):
    query = f"?{urllib.parse.urlencode({'project': args.project})}" if args.project else ""
    return client.request("GET", f"/api/v1/containers{query}")


ALIASES_PATH = "/api/v1/proxy/aliases"


def _alias_create(client, parser, args):
    body = {"container_id": args.container_id, "alias": args.alias, "program": args.program, "index": args.index}
    return client.request("POST", ALIASES_PATH, body)


def _alias_list(client, parser, args):
    query = f"?{urllib.parse.urlencode({'container_id': args.container_id})}" if args.container_id else ""
    return client.request("GET", ALIASES_PATH + query)


def _alias_get(client, parser, args):
    return client.request("GET", f"{ALIASES_PATH}/{args.alias}")


def _alias_delete(client, parser, args):
    return client.request("DELETE", f"{ALIASES_PATH}/{args.alias}")


def _domain_add(client, parser, args):
    return client.request("POST", f"{ALIASES_PATH}/{args.alias}/domains", {"domain": args.domain})


def _domain_list(client, parser, args):
    return client.request("GET", f"{ALIASES_PATH}/{args.alias}/domains")


def _domain_delete(client, parser, args):
    return client.request("DELETE", f"{ALIASES_PATH}/{args.alias}/domains/{args.domain}")


def _reload(client, parser, args):
    return client.request("POST", "/api/v1/reload")


# -- talking to the API -------------------------------------------------------------------

class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is here: the token must not follow it elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


#: How much of an error answer is read (its JSON message is short).
MAX_ERROR_BODY = 1 << 20


class StreamLost(Exception):
    """Reading an :class:`EventStream` failed (``error``): the connection is gone or silent."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class EventStream:
    """An open streamed answer (:meth:`Client.stream`): its lines as they come."""

    def __init__(self, connection: http.client.HTTPConnection, sock: socket.socket | None,
                 response: http.client.HTTPResponse) -> None:
        self.connection, self.sock, self.response = connection, sock, response
        self.timeout = connection.timeout

    def readline(self, limit: int) -> bytes:
        """The next line (at most ``limit`` bytes), b"" at the end of the stream;
        :class:`StreamLost` if the connection fails or stays silent past the timeout."""
        try:
            return self.response.readline(limit)
        except (OSError, http.client.HTTPException) as error:
            raise StreamLost(error) from None

    def set_timeout(self, seconds: float | None) -> None:
        """Wait at most ``seconds`` for each further read."""
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def close(self) -> None:
        self.response.close()
        self.connection.close()


class Client:
    """One admin API, one token; :meth:`request` answers (status, parsed body or None).

    ``url_source`` and ``token_source`` say where the URL and the token came from (e.g.
    ``--token``, ``/srv/data/admin-token, from ./data/admin.json``): a 401 or an
    unreachable API names them, so a token read from the wrong data directory is a
    one-line fix.
    """

    def __init__(self, base_url: str, token: str, timeout: float, *,
                 url_source: str | None = None, token_source: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.url_source = url_source
        self.token_source = token_source
        # No proxies from the environment (the token goes to the node, not through a
        # proxy) and no redirects.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                return response.status, self._parse(response.read())
        except urllib.error.HTTPError as error:
            with error:
                raw = error.read()
            raise self._refused(error.code, error.reason, raw) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise self._unreachable(error) from None

    def stream(self, method: str, path: str, body: Any) -> EventStream:
        """Send a request whose 2xx answer is a stream (a tap's events); the open stream.

        Through :mod:`http.client`, which de-chunks the body as it comes; no proxy and no
        redirect, as for :meth:`request`, and the same errors.
        """
        parts = urllib.parse.urlsplit(self.base_url)
        https = parts.scheme == "https"
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port or (443 if https else 80), timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/x-ndjson, application/json",
                   "Content-Type": "application/json"}
        try:
            connection.request(method, parts.path + path, body=json.dumps(body).encode(), headers=headers)
            sock = connection.sock  # kept: getresponse() drops it when the answer ends the connection
            response = connection.getresponse()
            if not 200 <= response.status < 300:
                raise self._refused(response.status, response.reason, response.read(MAX_ERROR_BODY))
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise self._unreachable(error) from None
        except BaseException:
            connection.close()
            raise
        return EventStream(connection, sock, response)

    def _refused(self, code: int, reason: Any, raw: bytes) -> Failed:
        """The API's error answer as the one line to print (a 401 says which token was sent)."""
        message = f"{code} {self._message(raw, reason)}"
        if code == 401 and self.token_source:
            message += (f" (the token sent: {self.token_source}; for another node give --data-dir DIR "
                        f"(its --data-dir), set ${DATA_DIR_ENV}, or give --token)")
        return Failed(EXIT_API_ERROR, message)

    def _unreachable(self, error: BaseException, doing: str = "cannot reach",
                     timeout: float | None = None) -> Failed:
        """A connection that failed (or timed out after ``timeout``, by default the
        client's) as the one line to print."""
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, (socket.timeout, TimeoutError)):
            why = f"no answer within {self.timeout if timeout is None else timeout:g} s"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror
        else:
            why = str(reason) or type(reason).__name__
        where = f" ({self.url_source})" if self.url_source else ""
        return Failed(EXIT_USAGE, f"{doing} the admin API at {self.base_url}{where}: {_one_line(why)}")

    @staticmethod
    def _parse(raw: bytes) -> Any:
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return raw.decode("utf-8", "replace")

    @staticmethod
    def _message(raw: bytes, reason: Any) -> str:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            message, field = body["message"], body.get("field")
            if isinstance(field, str) and field and not message.startswith(field):
                message = f"{field}: {message}"  # the field named once, whichever way the API put it
            return _one_line(message)
        return _one_line(str(reason or "error"))


def _check_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failed(EXIT_USAGE, f"the admin URL {url!r} is not http(s)://host[:port]")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise Failed(EXIT_USAGE, f"the admin URL {url!r} has a bad port") from None
    if parts.query or parts.fragment:
        raise Failed(EXIT_USAGE, f"the admin URL {url!r} must not have a query or fragment")
    return url


def _check_token(token: str) -> str:
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise Failed(EXIT_USAGE, "the admin token has characters a header cannot carry "
                                 "(spaces, control or non-ASCII characters)")
    return token


def connect(args) -> Client:
    """The client for this run: the URL and token :mod:`hoodyproxy.admin.discovery` finds.

    The data directory is looked for (and its ``admin.json`` read) only if the options
    and the environment leave something open, so they never trip on a broken file.
    """
    data_dir = functools.cache(functools.partial(find_data_dir, args.data_dir))
    try:
        url, url_source = find_url(args.admin_url, args.data_dir is not None, data_dir)
        token, token_source = find_token(args.token, args.data_dir is not None, data_dir)
    except NoAdminAccess as e:
        raise Failed(EXIT_USAGE, str(e)) from None
    return Client(_check_url(url), _check_token(token), args.timeout,
                  url_source=url_source, token_source=token_source)


def _print_warnings(body: Any) -> None:
    """The answer's ``warnings`` (stored, but probably not as meant), one line each on stderr."""
    warnings = body.get("warnings") if isinstance(body, dict) else None
    if not isinstance(warnings, list):
        return
    for item in warnings:
        if isinstance(item, dict):
            field, message = item.get("field"), item.get("message")
            text = f"{field}: {message}" if field else str(message)
        else:
            text = str(item)
        sys.stderr.write(f"{PROG}: warning: {_one_line(text)}\n")
    sys.stderr.flush()


def _print_json(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        sys.stdout.write(value if value.endswith("\n") else value + "\n")
    else:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


#: The options that take a value, and every option string the command knows.
VALUE_OPTIONS = frozenset(("--admin-url", "--token", "--data-dir", "--timeout", "--project", "--container",
                           "--groups", "--permissions", "--default", "--remove-group", "--remove-permissions",
                           "--address", "--state", "--port", "--container-id", "--alias", "--program",
                           "--index", "--domain", "--per-client", "--per-principal", "--per-container",
                           "--per-project", "--per-program", "--remove", "--remove-program", "--host", "--path",
                           "--method", "--status", "--header", "--bodies", "--ws-bytes", "--ttl",
                           "--max-events", "--har"))
OPTIONS = VALUE_OPTIONS | {"-h", "--help", "--version", "--dry-run", "--no-dry-run", "--ws-only", "--no-headers",
                           "--ws", "--no-redact", "--json"}


def _join_values(argv: Sequence[str]) -> list[str]:
    """``--token -abc`` as ``--token=-abc``: argparse takes a value starting with ``-`` for an
    option, and fails, but generated tokens start with ``-`` one time in 64."""
    words, out = list(argv), []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            out.extend(words[i:])
            break
        if word in VALUE_OPTIONS and i + 1 < len(words) and words[i + 1].startswith("-") \
                and words[i + 1] not in OPTIONS:
            out.append(f"{word}={words[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, do one request, print; the exit status (argparse exits 2 itself)."""
    parser = build_parser()
    args = parser.parse_args(_join_values(sys.argv[1:] if argv is None else argv))
    leaf = args.parser  # the command's own parser: its usage line goes with its errors
    try:
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            leaf.error("argument --timeout: must be a number of seconds more than 0")
        client = connect(args)
        _, body = args.handler(client, leaf, args)
    except Failed as failure:
        sys.stderr.write(f"{PROG}: {failure.message}\n")
        return failure.status
    _print_json(body)
    _print_warnings(body)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``hoodyproxy`` console script."""
    try:
        status = run(argv)
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        # stdout closed early (``| head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
