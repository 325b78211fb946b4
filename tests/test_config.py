"""Specification of the config: embedded defaults, file < overrides, and errors naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from hoodyproxy import config
from hoodyproxy.config import (
    DEFAULT_PROGRAMS,
    ConfigError,
    settings_to_mapping,
    ListenAddress,
    Program,
    load_settings,
    settings_from_mapping,
)

TAP_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tap-configs")
DEVELOPMENT = os.path.join(TAP_CONFIGS, "development.toml")
PRODUCTION = os.path.join(TAP_CONFIGS, "production.toml")


class TempDirMixin:
    def temp_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="hoodyproxy-config-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def write(self, name: str, text: str | bytes) -> str:
        path = os.path.join(self.temp_dir(), name)
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path


class DefaultTests(SynchronousTestCase):
    """With nothing configured, a development node on well-known ports."""

    def test_node_and_zone(self) -> None:
        """The default node is ``node-local`` in zone ``containers.localhost``."""
        s = settings_from_mapping({})
        self.assertEqual((s.node, s.zone, s.suffix),
                         ("node-local", "containers.localhost", "node-local.containers.localhost"))

    def test_listen_addresses(self) -> None:
        """HTTPS on 8443 and HTTP on 8080 on all interfaces of both families; admin on 127.0.0.1:8081."""
        s = settings_from_mapping({})
        self.assertEqual(s.https, (ListenAddress("::", 8443),))
        self.assertEqual(s.http, (ListenAddress("::", 8080),))
        self.assertEqual(s.admin, (ListenAddress("127.0.0.1", 8081),))
        self.assertEqual(s.https_port, 8443)

    def test_programs(self) -> None:
        """terminal (76), display (3998) and sqlite (5) are instance programs; http's index is the port."""
        programs = settings_from_mapping({}).programs
        self.assertEqual(dict(programs), {
            "terminal": Program("terminal", "instance", 76, "terminal", 999),
            "display": Program("display", "instance", 3998, "display", 999),
            "sqlite": Program("sqlite", "instance", 5, "sqlite", 999),
            "http": Program("http", "port", None, "http", 999),
        })

    def test_optional_features_are_off(self) -> None:
        """No TLS files, no admin token, no audit path and no demo unless configured."""
        s = settings_from_mapping({})
        self.assertEqual((s.tls_certificate, s.tls_key, s.admin_token, s.audit_path, s.demo),
                         (None, None, None, None, False))

    def test_timeouts(self) -> None:
        """Every timeout and bound has a finite positive default."""
        s = settings_from_mapping({})
        self.assertEqual(
            (s.connect_timeout, s.response_timeout, s.pool_idle_timeout, s.pool_max_idle,
             s.client_idle_timeout, s.websocket_handshake_timeout, s.websocket_idle_timeout),
            (5.0, 60.0, 60.0, 256, 75.0, 10.0, 3600.0))

    def test_data_dir_from_environment(self) -> None:
        """``$HOODYPROXY_DATA_DIR`` sets the default data directory; the audit log lives in it."""
        self.patch(os, "environ", dict(os.environ, HOODYPROXY_DATA_DIR="/srv/hoody"))
        s = settings_from_mapping({})
        self.assertEqual(s.data_dir, "/srv/hoody")
        self.assertEqual(s.audit_file, "/srv/hoody/audit.log")

    def test_no_file_is_the_defaults(self) -> None:
        """``load_settings()`` with no path gives the embedded defaults."""
        self.assertEqual(load_settings(), settings_from_mapping({}))

    def test_settings_are_frozen(self) -> None:
        """Settings cannot be changed once validated."""
        s = settings_from_mapping({})
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, s, "node", "other")

    def test_programs_are_immutable(self) -> None:
        """The validated programs mapping cannot be changed either.

        ``Settings`` is documented as immutable, but ``programs`` is a plain dict that any
        holder of the settings can mutate.
        """
        s = settings_from_mapping({})
        with self.assertRaises(TypeError):
            s.programs["evil"] = Program("evil", "port")  # type: ignore[index]
        self.assertNotIn("evil", settings_from_mapping({}).programs)

    def test_defaults_are_not_shared(self) -> None:
        """Settings built from one document never change the embedded default programs."""
        settings_from_mapping({"programs": {"files": {"port": 8222}}})
        self.assertNotIn("files", DEFAULT_PROGRAMS)
        self.assertNotIn("files", settings_from_mapping({}).programs)


class ValueTests(SynchronousTestCase):
    """How accepted values are read."""

    def test_bare_port(self) -> None:
        """A bare port listens on all interfaces, IPv6 and IPv4 (``::``), or on loopback for admin."""
        s = settings_from_mapping({"listen": {"https": 443, "http": "80", "admin": 9000}})
        self.assertEqual(s.https, (ListenAddress("::", 443),))
        self.assertEqual(s.http, (ListenAddress("::", 80),))
        self.assertEqual(s.admin, (ListenAddress("127.0.0.1", 9000),))

    def test_ipv6_and_lists(self) -> None:
        """A listen value may be a list, with IPv6 addresses in brackets."""
        s = settings_from_mapping({"listen": {"https": ["127.0.0.1:8443", "[::1]:8443"]}})
        self.assertEqual(s.https, (ListenAddress("127.0.0.1", 8443), ListenAddress("::1", 8443)))
        self.assertEqual(str(s.https[1]), "[::1]:8443")

    def test_names_are_lowercased(self) -> None:
        """Node and zone are DNS names, lowercased, a trailing dot dropped."""
        s = settings_from_mapping({"node": {"name": "Node-US", "zone": "Containers.Example.COM."}})
        self.assertEqual(s.suffix, "node-us.containers.example.com")

    def test_program_table_changes_a_default_key_by_key(self) -> None:
        """A ``[programs.<default>]`` table replaces only the keys it sets."""
        s = settings_from_mapping({"programs": {"terminal": {"max_instance": 5}}})
        self.assertEqual(s.programs["terminal"], Program("terminal", "instance", 76, "terminal", 5))

    def test_new_program(self) -> None:
        """A new ``[programs.<name>]`` table adds a program (kind generic unless set)."""
        s = settings_from_mapping({"programs": {"files": {"port": 8222}}})
        self.assertEqual(s.programs["files"], Program("files", "instance", 8222, "generic", 999))

    def test_relative_data_dir_is_made_absolute(self) -> None:
        """A relative data_dir is resolved against the working directory."""
        s = settings_from_mapping({"node": {"data_dir": "./state"}})
        self.assertEqual(s.data_dir, os.path.abspath("state"))

    def test_empty_tls_and_token_mean_unset(self) -> None:
        """Empty strings for the TLS files and the admin token mean "not configured"."""
        s = settings_from_mapping({"tls": {"certificate": "", "key": ""}, "admin": {"token": ""}})
        self.assertEqual((s.tls_certificate, s.tls_key, s.admin_token), (None, None, None))


class OverrideTests(TempDirMixin, SynchronousTestCase):
    """Command-line overrides (``"section.key"``) beat the file, which beats the defaults."""

    def test_override_beats_file(self) -> None:
        """An override replaces the value the file set."""
        path = self.write("c.toml", '[node]\nname = "from-file"\n[listen]\nhttps = 443\n')
        s = load_settings(path, {"node.name": "from-cli", "listen.https": "127.0.0.1:9443"})
        self.assertEqual(s.node, "from-cli")
        self.assertEqual(s.https, (ListenAddress("127.0.0.1", 9443),))

    def test_file_beats_defaults(self) -> None:
        """What the file sets and no override touches comes from the file."""
        path = self.write("c.toml", '[node]\nname = "from-file"\n')
        s = load_settings(path, {"node.zone": "example.com"})
        self.assertEqual((s.node, s.zone), ("from-file", "example.com"))

    def test_none_override_keeps_file_value(self) -> None:
        """An override of None (an option not given) leaves the file's value."""
        path = self.write("c.toml", '[demo]\nenabled = true\n')
        self.assertTrue(load_settings(path, {"demo.enabled": None, "node.name": None}).demo)

    def test_override_into_absent_section(self) -> None:
        """An override may set a key of a section the file does not have."""
        self.assertTrue(settings_from_mapping({}, {"demo.enabled": True}).demo)

    def test_overrides_do_not_change_the_document(self) -> None:
        """Applying overrides leaves the caller's document as it was."""
        doc = {"node": {"name": "from-file"}}
        settings_from_mapping(doc, {"node.name": "from-cli"})
        self.assertEqual(doc, {"node": {"name": "from-file"}})

    def test_overrides_are_validated(self) -> None:
        """A bad override is a ConfigError naming the key it sets."""
        e = self.assertRaises(ConfigError, settings_from_mapping, {}, {"listen.https": "nowhere:1"})
        self.assertEqual(e.key, "[listen] https")


class ErrorTests(TempDirMixin, SynchronousTestCase):
    """Every bad value is a ConfigError whose key names the ``[section] key`` at fault."""

    def assertConfigError(self, doc: dict, key: str) -> ConfigError:
        e = self.assertRaises(ConfigError, settings_from_mapping, doc)
        self.assertEqual(e.key, key, f"{doc!r}: {e}")
        self.assertTrue(str(e).startswith(key + ": "), str(e))
        self.assertTrue(e.problem, str(e))
        return e

    def test_message_format(self) -> None:
        """``str(ConfigError)`` is ``"[section] key: problem"``."""
        e = ConfigError("[node] name", "must be a single DNS label")
        self.assertEqual(str(e), "[node] name: must be a single DNS label")
        self.assertIsInstance(e, ValueError)

    def test_unknown_section(self) -> None:
        """An unknown section names the section."""
        self.assertConfigError({"nodes": {"name": "x"}}, "[nodes]")

    def test_section_not_a_table(self) -> None:
        """A section that is not a table names the section."""
        self.assertConfigError({"node": "node-us"}, "[node]")

    def test_unknown_key(self) -> None:
        """An unknown key names the section and the key."""
        self.assertConfigError({"node": {"nmae": "x"}}, "[node] nmae")
        self.assertConfigError({"upstream": {"timeout": 1}}, "[upstream] timeout")

    def test_bad_node_name(self) -> None:
        """The node name is one DNS label."""
        self.assertConfigError({"node": {"name": "node.us"}}, "[node] name")
        self.assertConfigError({"node": {"name": "node_us"}}, "[node] name")
        self.assertConfigError({"node": {"name": ""}}, "[node] name")

    def test_bad_zone(self) -> None:
        """The zone is a DNS name."""
        self.assertConfigError({"node": {"zone": "containers..example"}}, "[node] zone")
        self.assertConfigError({"node": {"zone": 5}}, "[node] zone")

    def test_bad_data_dir(self) -> None:
        """data_dir is a string."""
        self.assertConfigError({"node": {"data_dir": 5}}, "[node] data_dir")

    def test_negative_timeouts(self) -> None:
        """Every timeout must be a number greater than zero."""
        for section, name in (("upstream", "connect_timeout"), ("upstream", "response_timeout"),
                              ("upstream", "pool_idle_timeout"), ("client", "idle_timeout"),
                              ("websocket", "handshake_timeout"), ("websocket", "idle_timeout")):
            for value in (-1, 0, -0.5, "5", True):
                self.assertConfigError({section: {name: value}}, f"[{section}] {name}")

    def test_nan_timeout(self) -> None:
        """A timeout of NaN (valid TOML: ``nan``) is refused.

        ``_number`` compares ``value < minimum`` and ``value == minimum``, both false
        for NaN, so NaN is accepted as a timeout.
        """
        self.assertConfigError({"upstream": {"connect_timeout": math.nan}}, "[upstream] connect_timeout")

    def test_pool_max_idle_is_a_positive_integer(self) -> None:
        """pool_max_idle must be an integer greater than zero."""
        for value in (0, -3, 2.5):
            self.assertConfigError({"upstream": {"pool_max_idle": value}}, "[upstream] pool_max_idle")

    def test_bad_listen_address(self) -> None:
        """A listen interface must be an IP address."""
        self.assertConfigError({"listen": {"https": "example.com:443"}}, "[listen] https")
        self.assertConfigError({"listen": {"admin": "[::1]8081"}}, "[listen] admin")
        self.assertConfigError({"listen": {"http": "[nowhere]:80"}}, "[listen] http")
        self.assertConfigError({"listen": {"https": 443.0}}, "[listen] https")
        self.assertConfigError({"listen": {"https": []}}, "[listen] https")

    def test_bad_port(self) -> None:
        """A listen port must be 0 to 65535."""
        self.assertConfigError({"listen": {"https": 65536}}, "[listen] https")
        self.assertConfigError({"listen": {"http": "127.0.0.1:-1"}}, "[listen] http")
        self.assertConfigError({"listen": {"admin": "127.0.0.1:admin"}}, "[listen] admin")
        self.assertConfigError({"listen": {"https": ["127.0.0.1:443", "127.0.0.1:99999"]}}, "[listen] https")

    def test_instance_program_without_port(self) -> None:
        """A new program with index "instance" needs a port."""
        self.assertConfigError({"programs": {"files": {"index": "instance"}}}, "[programs.files] port")
        self.assertConfigError({"programs": {"http": {"index": "instance"}}}, "[programs.http] port")

    def test_port_program_with_port(self) -> None:
        """A program with index "port" must not set a port."""
        self.assertConfigError({"programs": {"web": {"index": "port", "port": 80}}}, "[programs.web] port")

    def test_bad_program_port(self) -> None:
        """An instance program's port is an integer from 1 to 65535."""
        for value in (0, 65536, "76", 76.0):
            self.assertConfigError({"programs": {"files": {"port": value}}}, "[programs.files] port")

    def test_bad_program_name(self) -> None:
        """A program name is a lowercase letter then up to 11 letters or digits."""
        for name in ("Files", "1files", "file-manager", "abcdefghijklm", ""):
            self.assertConfigError({"programs": {name: {"port": 1}}}, f"[programs.{name}]")

    def test_bad_kind(self) -> None:
        """kind is one of the known service kinds."""
        self.assertConfigError({"programs": {"files": {"port": 8222, "kind": "ftp"}}}, "[programs.files] kind")

    def test_bad_index(self) -> None:
        """index is "instance" or "port"."""
        self.assertConfigError({"programs": {"files": {"index": "number"}}}, "[programs.files] index")

    def test_bad_max_instance(self) -> None:
        """max_instance is an integer of at least 1."""
        self.assertConfigError({"programs": {"terminal": {"max_instance": 0}}}, "[programs.terminal] max_instance")

    def test_unknown_program_key(self) -> None:
        """A program table rejects keys it does not know, naming them."""
        self.assertConfigError({"programs": {"files": {"port": 8222, "colour": "red"}}}, "[programs.files] colour")

    def test_program_not_a_table(self) -> None:
        """A program entry must be a table."""
        self.assertConfigError({"programs": {"files": 8222}}, "[programs.files]")

    def test_certificate_without_key(self) -> None:
        """A certificate without a key names the missing key; a key without a certificate the certificate."""
        cert = self.write("cert.pem", b"cert")
        self.assertConfigError({"tls": {"certificate": cert}}, "[tls] key")
        self.assertConfigError({"tls": {"key": cert}}, "[tls] certificate")

    def test_missing_tls_files(self) -> None:
        """TLS files that do not exist name the key that points at them."""
        present = self.write("present.pem", b"pem")
        missing = os.path.join(self.temp_dir(), "missing.pem")
        self.assertConfigError({"tls": {"certificate": missing, "key": present}}, "[tls] certificate")
        self.assertConfigError({"tls": {"certificate": present, "key": missing}}, "[tls] key")

    def test_tls_files_that_exist(self) -> None:
        """A certificate and key that both exist are accepted."""
        cert, key = self.write("c.pem", b"c"), self.write("k.pem", b"k")
        s = settings_from_mapping({"tls": {"certificate": cert, "key": key}})
        self.assertEqual((s.tls_certificate, s.tls_key), (cert, key))

    def test_short_admin_token(self) -> None:
        """The admin token must be at least 16 characters."""
        self.assertConfigError({"admin": {"token": "x" * 15}}, "[admin] token")
        self.assertEqual(settings_from_mapping({"admin": {"token": "x" * 16}}).admin_token, "x" * 16)

    def test_metrics_keys(self) -> None:
        """The metrics token is at least 16 characters (empty: none); container_labels a boolean, off."""
        self.assertConfigError({"admin": {"metrics_token": "x" * 15}}, "[admin] metrics_token")
        self.assertEqual(settings_from_mapping({"admin": {"metrics_token": "m" * 16}}).metrics_token, "m" * 16)
        self.assertIsNone(settings_from_mapping({"admin": {"metrics_token": ""}}).metrics_token)
        self.assertConfigError({"metrics": {"container_labels": "yes"}}, "[metrics] container_labels")
        self.assertFalse(settings_from_mapping({}).metrics_container_labels)
        s = settings_from_mapping({"admin": {"token": "a" * 16, "metrics_token": "m" * 16},
                                   "metrics": {"container_labels": True}})
        self.assertEqual(settings_from_mapping(config.settings_to_mapping(s)), s)

    def test_bad_demo(self) -> None:
        """demo enabled is a boolean."""
        self.assertConfigError({"demo": {"enabled": "yes"}}, "[demo] enabled")

    def test_invalid_toml(self) -> None:
        """A file that is not TOML is an error naming the config file."""
        path = self.write("bad.toml", "[node\nname = ")
        e = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(e.key, "--config")
        self.assertIn("not valid TOML", e.problem)

    def test_missing_file(self) -> None:
        """A config file that does not exist is an error naming the config file."""
        path = os.path.join(self.temp_dir(), "absent.toml")
        e = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(e.key, "--config")
        self.assertIn(path, e.problem)

    def test_unreadable_file(self) -> None:
        """A config path that cannot be read (here a directory) is an error naming the config file."""
        e = self.assertRaises(ConfigError, load_settings, self.temp_dir())
        self.assertEqual(e.key, "--config")

    def test_file_errors_name_the_key(self) -> None:
        """Errors in a file's values name the key just as errors in a mapping do."""
        path = self.write("c.toml", "[upstream]\nconnect_timeout = -1\n")
        e = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(str(e), "[upstream] connect_timeout: must be greater than 0")


class ClientIPTests(SynchronousTestCase):
    """``[client_ip]``: how containers learn the client's address, per node and per program."""

    def assertConfigError(self, doc: dict, key: str) -> ConfigError:
        e = self.assertRaises(ConfigError, settings_from_mapping, doc)
        self.assertEqual(e.key, key, f"{doc!r}: {e}")
        return e

    def test_defaults(self) -> None:
        """The default mode is ``auto`` with mark 0x4870 and table 4870; no program overrides it."""
        s = settings_from_mapping({})
        self.assertEqual((s.client_ip_mode, s.client_ip_mark, s.client_ip_table), ("auto", 0x4870, 4870))
        self.assertTrue(all(p.client_ip is None for p in s.programs.values()))

    def test_every_mode(self) -> None:
        """auto, transparent, proxy-protocol and headers are the modes."""
        for mode in ("auto", "transparent", "proxy-protocol", "headers"):
            self.assertEqual(settings_from_mapping({"client_ip": {"mode": mode}}).client_ip_mode, mode)

    def test_bad_mode(self) -> None:
        """Any other mode is an error naming the key and the choices."""
        e = self.assertConfigError({"client_ip": {"mode": "kernel"}}, "[client_ip] mode")
        self.assertIn("transparent", e.problem)

    def test_mark_and_table(self) -> None:
        """The mark is a 32-bit value other than 0; the table is not one the kernel reserves."""
        s = settings_from_mapping({"client_ip": {"mark": 0x1, "table": 100}})
        self.assertEqual((s.client_ip_mark, s.client_ip_table), (1, 100))
        for bad in (0, -1, 2 ** 32, "0x10", 1.5):
            self.assertConfigError({"client_ip": {"mark": bad}}, "[client_ip] mark")
        for bad in (0, 253, 254, 255, 2 ** 32, True):
            self.assertConfigError({"client_ip": {"table": bad}}, "[client_ip] table")

    def test_program_override(self) -> None:
        """A program's ``client_ip`` overrides the node's mode for that program only."""
        s = settings_from_mapping({"programs": {"terminal": {"client_ip": "headers"},
                                                "web": {"index": "port", "client_ip": "proxy-protocol"}}})
        self.assertEqual(s.programs["terminal"].client_ip, "headers")
        self.assertEqual(s.programs["terminal"].port, 76)
        self.assertEqual(s.programs["web"].client_ip, "proxy-protocol")
        self.assertIsNone(s.programs["display"].client_ip)
        self.assertConfigError({"programs": {"http": {"client_ip": "maybe"}}}, "[programs.http] client_ip")

    def test_command_line_option(self) -> None:
        """``--client-ip-mode`` overrides the file's ``[client_ip] mode``."""
        from hoodyproxy.service import Options
        options = Options()
        options.parseOptions(["--client-ip-mode", "headers"])
        s = settings_from_mapping({"client_ip": {"mode": "transparent"}}, options.overrides())
        self.assertEqual(s.client_ip_mode, "headers")

    def test_resolve_auto(self) -> None:
        """``auto`` (node or program) becomes transparent when the node can be, else headers;
        explicit modes stay."""
        s = settings_from_mapping({"programs": {"terminal": {"client_ip": "auto"},
                                                "display": {"client_ip": "proxy-protocol"}}})
        can = config.resolve_client_ip(s, True)
        cannot = config.resolve_client_ip(s, False)
        self.assertEqual((can.client_ip_mode, can.programs["terminal"].client_ip), ("transparent", "transparent"))
        self.assertEqual((cannot.client_ip_mode, cannot.programs["terminal"].client_ip), ("headers", "headers"))
        self.assertEqual(cannot.programs["display"].client_ip, "proxy-protocol")
        self.assertEqual(config.client_ip_modes(cannot), {"headers", "proxy-protocol"})

    def test_round_trip(self) -> None:
        """settings_to_mapping writes the client IP keys back (workers are started from it)."""
        s = settings_from_mapping({"client_ip": {"mode": "transparent", "mark": 7, "table": 70},
                                   "programs": {"sqlite": {"client_ip": "headers"}}})
        self.assertEqual(settings_from_mapping(config.settings_to_mapping(s)), s)


class DockerSettingsTests(SynchronousTestCase):
    """``[docker]``: the Docker provider's switch, socket, network and label prefix."""

    def test_defaults(self) -> None:
        """Off, the socket found at start, no network named, labels ``hoody.*``."""
        s = settings_from_mapping({})
        self.assertEqual((s.docker_enabled, s.docker_socket, s.docker_network, s.docker_label_prefix),
                         (False, "", "", "hoody."))

    def test_values(self) -> None:
        """A ``unix://`` socket is kept as its path."""
        s = settings_from_mapping({"docker": {"enabled": True, "socket": "unix:///run/podman/podman.sock",
                                              "network": "hoody_net", "label_prefix": "com.example.hoody."}})
        self.assertEqual((s.docker_enabled, s.docker_socket, s.docker_network, s.docker_label_prefix),
                         (True, "/run/podman/podman.sock", "hoody_net", "com.example.hoody."))

    def test_socket_proxy(self) -> None:
        """``tcp://host:port``: a read-only socket proxy (docker-socket-proxy) on a TCP port."""
        s = settings_from_mapping({"docker": {"socket": "tcp://127.0.0.1:2375"}})
        self.assertEqual(s.docker_socket, "tcp://127.0.0.1:2375")
        self.assertEqual(config.tcp_address("tcp://[::1]:2375"), ("::1", 2375))

    def test_errors(self) -> None:
        """Each bad value names its key."""
        for table, key in (({"enabled": "yes"}, "enabled"), ({"socket": "tcp://10.0.0.1"}, "socket"),
                           ({"socket": "ssh://host"}, "socket"),
                           ({"socket": "docker.sock"}, "socket"), ({"socket": 5}, "socket"),
                           ({"network": "bad network"}, "network"), ({"label_prefix": ""}, "label_prefix"),
                           ({"label_prefix": "Hoody."}, "label_prefix")):
            e = self.assertRaises(ConfigError, settings_from_mapping, {"docker": table})
            self.assertEqual(e.key, f"[docker] {key}", table)

    def test_command_line(self) -> None:
        """``--docker`` turns the provider on; ``--docker-socket`` names the socket and turns it on too."""
        from hoodyproxy.service import Options
        for argv, expected in ((["--docker"], (True, "")),
                               (["--docker-socket", "/run/podman/podman.sock"], (True, "/run/podman/podman.sock")),
                               ([], (False, ""))):
            options = Options()
            options.parseOptions(argv)
            s = settings_from_mapping({}, options.overrides())
            self.assertEqual((s.docker_enabled, s.docker_socket), expected, argv)

    def test_round_trip(self) -> None:
        """settings_to_mapping writes the ``[docker]`` keys back."""
        s = settings_from_mapping({"docker": {"enabled": True, "socket": "/x/docker.sock", "network": "n1",
                                              "label_prefix": "acme."}})
        self.assertEqual(settings_from_mapping(config.settings_to_mapping(s)), s)


class TapConfigTests(TempDirMixin, SynchronousTestCase):
    """The example configs in ``tap-configs/`` load, validate and document the format."""

    def test_development_is_the_defaults_written_out(self) -> None:
        """development.toml is the embedded defaults with a local data_dir and the demo on."""
        s = load_settings(DEVELOPMENT)
        expected = dataclasses.replace(settings_from_mapping({}),
                                       data_dir=os.path.abspath("hoodyproxy-data"), demo=True)
        self.assertEqual(s, expected)

    def test_development_writes_out_every_key(self) -> None:
        """development.toml sets or shows (commented out) every key the config accepts."""
        with open(DEVELOPMENT) as f:
            text = f.read()
        with open(DEVELOPMENT, "rb") as f:
            doc = tomllib.load(f)
        for section, names in config._SCHEMA.items():
            for name in names:
                shown = f"\n{name} = " in text or f"\n# {name} = " in text
                self.assertTrue(shown, f"[{section}] {name} is not in development.toml")
        for section, tables in config._SUBTABLES.items():
            for table, names in tables.items():
                self.assertIn(f"\n[{section}.{table}]\n", text)
                for name in names:
                    shown = f"\n{name} = " in text or f"\n# {name} = " in text
                    self.assertTrue(shown, f"[{section}.{table}] {name} is not in development.toml")
        self.assertEqual(set(doc["programs"]), set(DEFAULT_PROGRAMS))

    def test_production(self) -> None:
        """production.toml is a production node: public ports, real zone, explicit timeouts."""
        s = load_settings(PRODUCTION)
        self.assertEqual((s.node, s.zone, s.data_dir),
                         ("node-us", "containers.example.com", "/var/lib/hoodyproxy"))
        self.assertEqual([a.port for a in s.https], [443])
        self.assertEqual([a.port for a in s.http], [80])
        self.assertEqual(s.admin, (ListenAddress("127.0.0.1", 8081),))
        self.assertEqual(s.programs["files"], Program("files", "instance", 8222, "files", 9))
        self.assertFalse(s.demo)

    def test_production_sets_timeouts_explicitly(self) -> None:
        """production.toml states every timeout rather than relying on defaults."""
        with open(PRODUCTION, "rb") as f:
            doc = tomllib.load(f)
        for section, names in (("upstream", config._SCHEMA["upstream"]), ("client", {"idle_timeout"}),
                               ("websocket", {"handshake_timeout", "idle_timeout"})):
            for name in names:
                self.assertIn(name, doc[section], f"[{section}] {name}")

    def test_production_with_certificate_files(self) -> None:
        """With real certificate files given, production.toml loads with them."""
        cert, key = self.write("c.pem", b"c"), self.write("k.pem", b"k")
        s = load_settings(PRODUCTION, {"tls.certificate": cert, "tls.key": key})
        self.assertEqual((s.tls_certificate, s.tls_key), (cert, key))

    def test_every_key_is_commented(self) -> None:
        """Every key line in both files carries or follows a comment."""
        for path in (DEVELOPMENT, PRODUCTION):
            with open(path) as f:
                lines = f.read().splitlines()
            for number, line in enumerate(lines):
                if "=" in line and not line.startswith("#") and not line.startswith("["):
                    commented = "#" in line or lines[number - 1].startswith("#")
                    self.assertTrue(commented, f"{os.path.basename(path)}:{number + 1}: {line}")


class StoreTests(SynchronousTestCase):
    """``[store] backend`` and ``[store.etcd]``: the shared store (docs/scale-out.rst)."""

    def test_sqlite_is_the_default(self) -> None:
        """With nothing configured the store is the node's own SQLite database."""
        self.assertEqual(settings_from_mapping({}).store_backend, "sqlite")

    def test_etcd_table(self) -> None:
        """A ``[store.etcd]`` table is read into ``Settings.etcd``."""
        s = settings_from_mapping({"store": {"backend": "etcd", "etcd": {
            "endpoints": ["http://10.0.0.1:2379/", "https://10.0.0.2:2379"], "prefix": "/hoody/v2/",
            "username": "u", "password": "p", "dial_timeout": 1, "request_timeout": 3, "lease_ttl": 5}}})
        self.assertEqual(s.store_backend, "etcd")
        self.assertEqual(s.etcd.endpoints, ("http://10.0.0.1:2379", "https://10.0.0.2:2379"))
        self.assertEqual((s.etcd.prefix, s.etcd.username, s.etcd.password), ("/hoody/v2", "u", "p"))
        self.assertEqual((s.etcd.dial_timeout, s.etcd.request_timeout, s.etcd.lease_ttl), (1, 3, 5))

    def test_unknown_etcd_key_is_named(self) -> None:
        """An unknown key in ``[store.etcd]`` is an error naming it."""
        with self.assertRaises(ConfigError) as e:
            settings_from_mapping({"store": {"etcd": {"endpoint": "http://x:2379"}}})
        self.assertEqual(e.exception.key, "[store.etcd] endpoint")

    def test_bad_values(self) -> None:
        """Bad backends, endpoints, prefixes and half-given credentials name their key."""
        for doc, key in (({"backend": "redis"}, "[store] backend"),
                         ({"etcd": {"endpoints": ["10.0.0.1:2379"]}}, "[store.etcd] endpoints"),
                         ({"etcd": {"endpoints": []}}, "[store.etcd] endpoints"),
                         ({"etcd": {"prefix": "hoody"}}, "[store.etcd] prefix"),
                         ({"etcd": {"username": "u"}}, "[store.etcd] password"),
                         ({"etcd": {"cert_file": "/c.pem"}}, "[store.etcd] key_file"),
                         ({"etcd": {"lease_ttl": 1}}, "[store.etcd] lease_ttl"),
                         ({"etcd": "x"}, "[store.etcd]")):
            with self.assertRaises(ConfigError, msg=repr(doc)) as e:
                settings_from_mapping({"store": doc})
            self.assertEqual(e.exception.key, key)

    def test_round_trip(self) -> None:
        """``settings_to_mapping`` keeps the store (the workers are given settings that way)."""
        s = settings_from_mapping({"store": {"backend": "etcd", "etcd": {"username": "u", "password": "p"}}})
        self.assertEqual(settings_from_mapping(settings_to_mapping(s)), s)
