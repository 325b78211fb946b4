"""Specification of permission sets: validation from the admin API, PATCH merges, JSON forms.

The group types here are small real IGroupType providers (not mocks), used until and
alongside the shipped ones in :mod:`hoodyproxy.access.groups`; the other access test
modules import them from here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hoodyproxy.access import InvalidPermissions, PermissionSet, parse_permission_set, to_json, to_stored_json
from hoodyproxy.access.model import challenge_kinds, from_stored_json
from hoodyproxy.interfaces import IGroupType

PROJECT = "67e89abc123def456789abcd"
OTHER_PROJECT = "0000000000000000000000aa"
CONTAINER = "890abcdef12345678901cdef"


@implementer(IGroupType)
class AddressGroup:
    """``{"type": "ip", "range": CIDR}``: the client's address is in the range."""

    name = "ip"
    challenge = None

    def parse(self, spec, field):
        if set(spec) - {"type", "range"}:
            raise InvalidPermissions(f"{field}.{sorted(set(spec) - {'type', 'range'})[0]}", "unknown field")
        try:
            network = ipaddress.ip_network(spec.get("range"))
        except (TypeError, ValueError):
            raise InvalidPermissions(f"{field}.range", "must be an address range like 10.0.0.0/8") from None
        return {"type": "ip", "range": str(network)}

    def redact(self, stored):
        return dict(stored)

    def check(self, stored, credentials):
        return ipaddress.ip_address(credentials.client_ip) in ipaddress.ip_network(stored["range"])


@implementer(IGroupType)
class TokenGroup:
    """``{"type": "token", "token": SECRET}`` stored salted and hashed; the salt is new at
    every ``parse``, so a stored group parsed twice would visibly change."""

    name = "token"
    challenge = "bearer"

    def __init__(self) -> None:
        self._salts = itertools.count(1)
        self.parsed = 0

    def parse(self, spec, field):
        self.parsed += 1
        token = spec.get("token")
        if not isinstance(token, str) or len(token) < 8:
            raise InvalidPermissions(f"{field}.token", "must be a string of at least 8 characters")
        salt = f"salt{next(self._salts)}"
        return {"type": "token", "salt": salt, "sha256": hashlib.sha256((salt + token).encode()).hexdigest()}

    def redact(self, stored):
        return {"type": "token"}

    def check(self, stored, credentials):
        if credentials.bearer is None:
            return False
        return hashlib.sha256((stored["salt"] + credentials.bearer).encode()).hexdigest() == stored["sha256"]


@implementer(IGroupType)
class PasswordGroup:
    """``{"type": "password", "user": NAME, "password": SECRET}`` (Basic authentication)."""

    name = "password"
    challenge = "basic"

    def parse(self, spec, field):
        user, password = spec.get("user"), spec.get("password")
        if not isinstance(user, str) or not user:
            raise InvalidPermissions(f"{field}.user", "is required")
        if not isinstance(password, str):
            raise InvalidPermissions(f"{field}.password", "is required")
        return {"type": "password", "user": user, "sha256": hashlib.sha256(password.encode()).hexdigest()}

    def redact(self, stored):
        return {"type": "password", "user": stored["user"]}

    def check(self, stored, credentials):
        return (credentials.basic is not None and credentials.basic[0] == stored["user"]
                and hashlib.sha256(credentials.basic[1].encode()).hexdigest() == stored["sha256"])


def registry() -> dict:
    """A fresh registry of the test group types."""
    return {t.name: t for t in (AddressGroup(), TokenGroup(), PasswordGroup())}


OFFICE = {"type": "ip", "range": "10.0.0.0/8"}
TEAM = {"type": "token", "token": "team-secret-1"}


def project_body(**overrides) -> dict:
    body = {"groups": {"office": OFFICE, "team": TEAM},
            "permissions": {"office": {"files": "read", "terminal": False},
                            "team": {"files": True, "terminal": True, "display": "control"}},
            "default": "deny"}
    body.update(overrides)
    return body


def container_body(**overrides) -> dict:
    return {**project_body(), "project": PROJECT, "container": CONTAINER, **overrides}


class ModelCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = registry()

    def parse(self, body, scope="project", url_id=PROJECT, **kw) -> PermissionSet:
        return parse_permission_set(body, scope, url_id, self.registry, **kw)

    def assertInvalid(self, field: str, body, scope="project", url_id=PROJECT, **kw) -> InvalidPermissions:
        """Parsing ``body`` fails naming exactly ``field``."""
        e = self.assertRaises(InvalidPermissions, self.parse, body, scope, url_id, **kw)
        self.assertEqual(e.field, field, str(e))
        self.assertTrue(str(e).startswith(field + ": "), str(e))
        return e


class GroupTypeProviderTests(SynchronousTestCase):
    def test_test_group_types_provide_interface(self) -> None:
        """The in-test group types really provide IGroupType (so they stand in for the shipped ones)."""
        for provider in registry().values():
            self.assertTrue(verifyObject(IGroupType, provider))


class InvalidPermissionsTests(SynchronousTestCase):
    def test_is_value_error_with_field(self) -> None:
        """InvalidPermissions is a ValueError carrying ``field`` and ``problem``; str is "field: problem"."""
        e = InvalidPermissions("groups.office.range", "bad range")
        self.assertIsInstance(e, ValueError)
        self.assertEqual((e.field, e.problem, str(e)), ("groups.office.range", "bad range",
                                                        "groups.office.range: bad range"))

    def test_exported_where_group_types_expect_it(self) -> None:
        """IGroupType.parse documents ``hoodyproxy.access.InvalidPermissions``: it is there."""
        import hoodyproxy.access
        from hoodyproxy.access.model import InvalidPermissions as model_class
        self.assertIs(hoodyproxy.access.InvalidPermissions, model_class)


class ValidSetTests(ModelCase):
    def test_project_set(self) -> None:
        """A valid project body becomes a project-scope set with groups in their stored form."""
        pset = self.parse(project_body())
        self.assertEqual((pset.scope, pset.project, pset.container, pset.default),
                         ("project", PROJECT, None, "deny"))
        self.assertEqual(pset.groups["office"], {"type": "ip", "range": "10.0.0.0/8"})
        self.assertEqual(set(pset.groups["team"]), {"type", "salt", "sha256"})
        self.assertEqual(dict(pset.permissions["office"]), {"files": "read", "terminal": False})

    def test_container_set(self) -> None:
        """A container body names its project; the set's id is the container's."""
        pset = self.parse(container_body(), "container", CONTAINER)
        self.assertEqual((pset.scope, pset.project, pset.container, pset.id),
                         ("container", PROJECT, CONTAINER, CONTAINER))

    def test_container_field_optional_at_container_level(self) -> None:
        """At container level ``container`` may be left out (the URL names it)."""
        body = container_body()
        del body["container"]
        self.assertEqual(self.parse(body, "container", CONTAINER).container, CONTAINER)

    def test_project_field_may_repeat_url(self) -> None:
        """At project level ``project`` may be given when it matches the URL."""
        self.assertEqual(self.parse(project_body(project=PROJECT)).project, PROJECT)

    def test_default_defaults_to_deny(self) -> None:
        """Without ``default`` a set denies what no group allows."""
        body = project_body()
        del body["default"]
        self.assertEqual(self.parse(body).default, "deny")

    def test_default_allow(self) -> None:
        """``default`` may be ``allow``."""
        self.assertEqual(self.parse(project_body(default="allow")).default, "allow")

    def test_empty_set(self) -> None:
        """``{}`` is a valid set: no groups, deny everything."""
        pset = self.parse({})
        self.assertEqual((dict(pset.groups), dict(pset.permissions), pset.default), ({}, {}, "deny"))

    def test_group_without_permissions(self) -> None:
        """A group may be defined without any permissions (it grants nothing)."""
        pset = self.parse({"groups": {"office": OFFICE}})
        self.assertEqual(list(pset.groups), ["office"])

    def test_every_level(self) -> None:
        """Each leveled capability accepts each of its levels, and true and false."""
        for capability, levels in {"files": ("read", "write"), "display": ("view", "control"),
                                   "sqlite": ("query", "modify")}.items():
            for grant in (*levels, True, False):
                pset = self.parse({"groups": {"office": OFFICE}, "permissions": {"office": {capability: grant}}})
                self.assertEqual(pset.permissions["office"][capability], grant)

    def test_unknown_capability_boolean(self) -> None:
        """A capability some configured kind might use is accepted with true or false."""
        pset = self.parse({"groups": {"office": OFFICE}, "permissions": {"office": {"gpu_jobs": True}}})
        self.assertIs(pset.permissions["office"]["gpu_jobs"], True)

    def test_extra_levels_for_plugin_kinds(self) -> None:
        """``levels`` adds leveled capabilities (from plugin kinds) whose levels are then accepted."""
        pset = self.parse({"groups": {"office": OFFICE}, "permissions": {"office": {"queue": "peek"}}},
                          levels={"queue": ("peek", "push")})
        self.assertEqual(pset.permissions["office"]["queue"], "peek")

    def test_group_names_at_the_edges(self) -> None:
        """Group names of one character, with digits, '_' and '-', up to 63 characters, are valid."""
        for name in ("a", "0", "dev_team-2", "a" * 63):
            self.assertIn(name, self.parse({"groups": {name: OFFICE}}).groups)

    def test_set_is_read_only(self) -> None:
        """A PermissionSet's fields and its maps cannot be changed."""
        pset = self.parse(project_body())
        with self.assertRaises(AttributeError):
            pset.default = "allow"  # type: ignore[misc]
        with self.assertRaises(TypeError):
            pset.groups["x"] = {}  # type: ignore[index]
        with self.assertRaises(TypeError):
            pset.permissions["office"]["files"] = True  # type: ignore[index]

    def test_body_not_mutated(self) -> None:
        """Parsing does not change the body it was given."""
        body = project_body()
        before = json.dumps(body, sort_keys=True)
        self.parse(body)
        self.assertEqual(json.dumps(body, sort_keys=True), before)


class FieldErrorTests(ModelCase):
    """Every invalid body is refused naming the field at fault."""

    def test_body_not_object(self) -> None:
        """A body that is not a JSON object: ``body``."""
        for body in (None, [], "x", 3):
            self.assertInvalid("body", body)

    def test_unknown_top_level_field(self) -> None:
        """An unknown top-level field is named."""
        self.assertInvalid("owner", project_body(owner="me"))

    def test_bad_url_id(self) -> None:
        """An id that is not 24 lowercase hex digits: ``id``."""
        self.assertInvalid("id", {}, url_id="ABC")
        self.assertInvalid("id", {}, url_id=PROJECT.upper())

    def test_project_mismatch_at_project_level(self) -> None:
        """At project level a ``project`` other than the URL's: ``project``."""
        self.assertInvalid("project", project_body(project=OTHER_PROJECT))

    def test_container_at_project_level(self) -> None:
        """A project-level set may not name a container: ``container``."""
        self.assertInvalid("container", project_body(container=CONTAINER))

    def test_container_project_required(self) -> None:
        """A container-level set must name its project: ``project``."""
        body = container_body()
        del body["project"]
        self.assertInvalid("project", body, "container", CONTAINER)

    def test_container_project_malformed(self) -> None:
        """A container-level ``project`` that is not 24 lowercase hex: ``project``."""
        for project in ("x", PROJECT.upper(), PROJECT + "\n", 7, None):
            self.assertInvalid("project", container_body(project=project), "container", CONTAINER)

    def test_container_mismatch(self) -> None:
        """A ``container`` other than the URL's: ``container``."""
        self.assertInvalid("container", container_body(container=OTHER_PROJECT), "container", CONTAINER)

    def test_container_project_must_match_live_map(self) -> None:
        """With ``container_project`` (from the live map), another project: ``project``."""
        self.assertInvalid("project", container_body(), "container", CONTAINER, container_project=OTHER_PROJECT)

    def test_container_project_matching_live_map(self) -> None:
        """With ``container_project`` equal to the body's project the set is valid."""
        pset = self.parse(container_body(), "container", CONTAINER, container_project=PROJECT)
        self.assertEqual(pset.project, PROJECT)

    def test_groups_not_object(self) -> None:
        """``groups`` that is not an object (null included): ``groups``."""
        for groups in ([], "x", None):
            self.assertInvalid("groups", project_body(groups=groups))

    def test_bad_group_name(self) -> None:
        """A group name outside ``[a-z0-9][a-z0-9_-]{0,62}``: ``groups``."""
        for name in ("", "Office", "-office", "_x", "a b", "é", "a" * 64, "office\n"):
            self.assertInvalid("groups", {"groups": {name: OFFICE}})

    def test_group_not_object(self) -> None:
        """A group that is not an object: ``groups.NAME``."""
        self.assertInvalid("groups.office", {"groups": {"office": "10.0.0.0/8"}})

    def test_group_null_in_put(self) -> None:
        """A null group outside a PATCH: ``groups.NAME``."""
        self.assertInvalid("groups.office", {"groups": {"office": None}})

    def test_group_type_missing(self) -> None:
        """A group without ``type``: ``groups.NAME.type``."""
        self.assertInvalid("groups.office.type", {"groups": {"office": {"range": "10.0.0.0/8"}}})

    def test_group_type_unknown(self) -> None:
        """A ``type`` the registry does not have: ``groups.NAME.type``."""
        self.assertInvalid("groups.office.type", {"groups": {"office": {"type": "kerberos"}}})

    def test_group_type_not_string(self) -> None:
        """A ``type`` that is not a string: ``groups.NAME.type``."""
        self.assertInvalid("groups.office.type", {"groups": {"office": {"type": ["ip"]}}})

    def test_group_type_error_names_its_field(self) -> None:
        """The group type's own error passes through: ``groups.office.range``."""
        self.assertInvalid("groups.office.range", {"groups": {"office": {"type": "ip", "range": "nope"}}})

    def test_group_type_error_other_field(self) -> None:
        """A group type names fields below the group: ``groups.team.token``."""
        self.assertInvalid("groups.team.token", {"groups": {"team": {"type": "token", "token": "short"}}})

    def test_too_many_groups(self) -> None:
        """More than 256 groups: ``groups``."""
        self.assertInvalid("groups", {"groups": {f"g{i}": OFFICE for i in range(257)}})

    def test_permissions_not_object(self) -> None:
        """``permissions`` that is not an object: ``permissions``."""
        for permissions in ([], "x", None):
            self.assertInvalid("permissions", project_body(permissions=permissions))

    def test_permissions_for_undefined_group(self) -> None:
        """Permissions for a group not defined: ``permissions.NAME``."""
        self.assertInvalid("permissions.ghost", project_body(permissions={"ghost": {"files": True}}))

    def test_permissions_bad_group_name(self) -> None:
        """A permissions key that is not a group name: ``permissions``."""
        self.assertInvalid("permissions", project_body(permissions={"Ghost!": {"files": True}}))

    def test_grants_not_object(self) -> None:
        """A group's permissions that are not an object: ``permissions.NAME``."""
        for grants in (True, ["files"], "files", None):
            self.assertInvalid("permissions.office", project_body(permissions={"office": grants}))

    def test_bad_capability_name(self) -> None:
        """A capability name outside ``[a-z][a-z0-9_]{0,31}``: ``permissions.NAME``."""
        for capability in ("", "Files", "1files", "files-x", "a" * 33, "files\n"):
            self.assertInvalid("permissions.office", project_body(permissions={"office": {capability: True}}))

    def test_unknown_level(self) -> None:
        """A level its capability does not have: ``permissions.NAME.CAPABILITY``."""
        for capability, level in (("files", "view"), ("display", "read"), ("sqlite", "write"), ("files", "READ")):
            e = self.assertInvalid(f"permissions.office.{capability}",
                                   project_body(permissions={"office": {capability: level}}))
            self.assertIn("true, false or one of", e.problem)

    def test_level_on_level_less_capability(self) -> None:
        """A level for ``terminal``, ``exec``, ``http`` or an unknown capability: must be true or false."""
        for capability in ("terminal", "exec", "http", "gpu_jobs"):
            e = self.assertInvalid(f"permissions.office.{capability}",
                                   project_body(permissions={"office": {capability: "read"}}))
            self.assertEqual(e.problem, "must be true or false")

    def test_grant_not_boolean_or_level(self) -> None:
        """Numbers, null and objects are not grants (1 is not true)."""
        for grant in (1, 0, None, {}, []):
            self.assertInvalid("permissions.office.files", project_body(permissions={"office": {"files": grant}}))

    def test_bad_default(self) -> None:
        """``default`` other than "allow" or "deny": ``default``."""
        for default in ("Allow", "permit", None, True):
            self.assertInvalid("default", project_body(default=default))

    def test_bad_scope_is_a_programming_error(self) -> None:
        """An unknown scope is a ValueError, not a client error."""
        e = self.assertRaises(ValueError, self.parse, {}, "node")
        self.assertNotIsInstance(e, InvalidPermissions)


class PatchTests(ModelCase):
    """PATCH merges into the stored set by name and validates the result as a whole."""

    def setUp(self) -> None:
        super().setUp()
        self.stored = self.parse(project_body())

    def patch(self, body, previous=None, scope="project", url_id=PROJECT, **kw) -> PermissionSet:
        return self.parse(body, scope, url_id, previous=previous or self.stored, patch=True, **kw)

    def test_empty_patch_keeps_everything(self) -> None:
        """``{}`` changes nothing."""
        self.assertEqual(self.patch({}), self.stored)

    def test_unmentioned_groups_not_reparsed(self) -> None:
        """Stored groups the patch does not name are kept exactly, their hashes untouched."""
        parsed = self.registry["token"].parsed
        result = self.patch({"groups": {"lab": {"type": "ip", "range": "192.168.0.0/16"}}})
        self.assertEqual(result.groups["team"], self.stored.groups["team"])
        self.assertEqual(self.registry["token"].parsed, parsed)

    def test_adds_group(self) -> None:
        """A new group name is added alongside the stored ones."""
        result = self.patch({"groups": {"lab": {"type": "ip", "range": "192.168.0.0/16"}}})
        self.assertEqual(sorted(result.groups), ["lab", "office", "team"])

    def test_replaces_named_group(self) -> None:
        """A group the patch names is replaced by the newly parsed spec (and hashed anew)."""
        result = self.patch({"groups": {"team": {"type": "token", "token": "another-secret"}}})
        self.assertNotEqual(result.groups["team"]["sha256"], self.stored.groups["team"]["sha256"])

    def test_null_deletes_group(self) -> None:
        """``null`` deletes a group (with its permissions deleted in the same patch)."""
        result = self.patch({"groups": {"office": None}, "permissions": {"office": None}})
        self.assertEqual(sorted(result.groups), ["team"])
        self.assertEqual(sorted(result.permissions), ["team"])

    def test_deleting_absent_name_is_harmless(self) -> None:
        """``null`` for a name that is not stored changes nothing."""
        self.assertEqual(self.patch({"groups": {"nobody": None}, "permissions": {"nobody": None}}), self.stored)

    def test_deleted_group_still_named_by_permissions(self) -> None:
        """Deleting a group that stored permissions still name: ``permissions.NAME``."""
        e = self.assertRaises(InvalidPermissions, self.patch, {"groups": {"office": None}})
        self.assertEqual(e.field, "permissions.office")

    def test_permissions_merged_by_name(self) -> None:
        """Permissions named in the patch replace that group's map; others are kept."""
        result = self.patch({"permissions": {"office": {"display": "view"}}})
        self.assertEqual(dict(result.permissions["office"]), {"display": "view"})
        self.assertEqual(result.permissions["team"], self.stored.permissions["team"])

    def test_null_deletes_permissions(self) -> None:
        """``null`` deletes a group's permissions; the group stays."""
        result = self.patch({"permissions": {"office": None}})
        self.assertNotIn("office", result.permissions)
        self.assertIn("office", result.groups)

    def test_default_replaced(self) -> None:
        """``default`` is replaced when given."""
        self.assertEqual(self.patch({"default": "allow"}).default, "allow")

    def test_default_kept(self) -> None:
        """``default`` is kept when not given (not reset to deny)."""
        allowing = self.parse(project_body(default="allow"))
        self.assertEqual(self.patch({}, previous=allowing).default, "allow")

    def test_null_default_refused(self) -> None:
        """``default: null`` is refused: ``default``."""
        e = self.assertRaises(InvalidPermissions, self.patch, {"default": None})
        self.assertEqual(e.field, "default")

    def test_new_group_validated(self) -> None:
        """A group added by a patch is validated by its type: ``groups.lab.range``."""
        e = self.assertRaises(InvalidPermissions, self.patch, {"groups": {"lab": {"type": "ip", "range": "x"}}})
        self.assertEqual(e.field, "groups.lab.range")

    def test_new_permissions_validated(self) -> None:
        """Permissions added by a patch are validated: ``permissions.office.files``."""
        e = self.assertRaises(InvalidPermissions, self.patch, {"permissions": {"office": {"files": "view"}}})
        self.assertEqual(e.field, "permissions.office.files")

    def test_permissions_for_group_added_in_same_patch(self) -> None:
        """A patch may add a group and its permissions together."""
        result = self.patch({"groups": {"lab": OFFICE}, "permissions": {"lab": {"terminal": True}}})
        self.assertIs(result.permissions["lab"]["terminal"], True)

    def test_container_patch_keeps_project(self) -> None:
        """A container-level patch need not repeat the project."""
        stored = self.parse(container_body(), "container", CONTAINER)
        result = self.patch({"default": "allow"}, previous=stored, scope="container", url_id=CONTAINER)
        self.assertEqual((result.project, result.container, result.default), (PROJECT, CONTAINER, "allow"))

    def test_container_patch_checks_live_project(self) -> None:
        """A container-level patch is checked against the live map's project: ``project``."""
        stored = self.parse(container_body(), "container", CONTAINER)
        e = self.assertRaises(InvalidPermissions, self.patch, {}, previous=stored, scope="container",
                              url_id=CONTAINER, container_project=OTHER_PROJECT)
        self.assertEqual(e.field, "project")

    def test_patch_does_not_change_previous(self) -> None:
        """The stored set given as ``previous`` is not changed by a patch."""
        before = to_stored_json(self.stored)
        self.patch({"groups": {"office": None}, "permissions": {"office": None}, "default": "allow"})
        self.assertEqual(to_stored_json(self.stored), before)

    def test_patch_without_previous_merges_into_empty(self) -> None:
        """``patch=True`` without ``previous`` (no set stored yet) reads the body as a whole set;
        a name given as ``null`` is nothing to delete."""
        result = self.parse({"groups": {"office": OFFICE, "gone": None},
                             "permissions": {"office": {"files": "read"}, "gone": None},
                             "default": "allow"}, patch=True)
        self.assertEqual((sorted(result.groups), dict(result.permissions["office"]), result.default),
                         (["office"], {"files": "read"}, "allow"))

    def test_patch_without_previous_needs_the_project_at_container_level(self) -> None:
        """A container-level patch with nothing stored must name the project, as a PUT must."""
        e = self.assertRaises(InvalidPermissions, self.parse, {"default": "deny"}, "container", CONTAINER,
                              patch=True)
        self.assertEqual(e.field, "project")


class JSONFormTests(ModelCase):
    def test_redacted_json(self) -> None:
        """``to_json`` shows each group through its type's ``redact``: no secret, no hash."""
        body = to_json(self.parse(project_body()), self.registry)
        self.assertEqual(body, {"project": PROJECT,
                                "groups": {"office": OFFICE, "team": {"type": "token"}},
                                "permissions": project_body()["permissions"], "default": "deny"})
        self.assertNotIn("team-secret-1", json.dumps(body))
        self.assertNotIn("sha256", json.dumps(body))

    def test_container_json_names_container(self) -> None:
        """A container-level set's JSON carries ``project`` and ``container``."""
        body = to_json(self.parse(container_body(), "container", CONTAINER), self.registry)
        self.assertEqual((body["project"], body["container"]), (PROJECT, CONTAINER))

    def test_unredacted_json_has_stored_form(self) -> None:
        """``redact=False`` gives the stored groups (hashes included, never the secret)."""
        pset = self.parse(project_body())
        body = to_json(pset, self.registry, redact=False)
        self.assertEqual(body["groups"]["team"], pset.groups["team"])
        self.assertNotIn("team-secret-1", json.dumps(body))

    def test_unknown_type_redacts_to_type_only(self) -> None:
        """A stored group whose type is no longer registered shows only its type."""
        body = to_json(self.parse(project_body()), {"ip": AddressGroup()})
        self.assertEqual(body["groups"]["team"], {"type": "token"})

    def test_stored_round_trip(self) -> None:
        """``to_stored_json`` then ``from_stored_json`` gives the same set, with nothing parsed again."""
        for pset in (self.parse(project_body()), self.parse(container_body(), "container", CONTAINER)):
            parsed = self.registry["token"].parsed
            self.assertEqual(from_stored_json(pset.scope, pset.id, to_stored_json(pset)), pset)
            self.assertEqual(self.registry["token"].parsed, parsed)

    def test_stored_json_is_plain_json(self) -> None:
        """The stored form is a JSON object without scope or id (they are columns)."""
        stored = json.loads(to_stored_json(self.parse(project_body())))
        self.assertEqual(set(stored), {"project", "groups", "permissions", "default"})

    def test_from_stored_json_rejects_garbage(self) -> None:
        """Text that is not a stored set raises ValueError."""
        for text in ("", "[]", "{}", '{"groups": {"a": {}}, "permissions": {}, "default": "deny"}',
                     '{"groups": {}, "permissions": {}, "default": "maybe"}'):
            self.assertRaises(ValueError, from_stored_json, "project", PROJECT, text)

    def test_challenge_kinds(self) -> None:
        """``challenge_kinds`` collects the challenges of the set's credential-based groups."""
        pset = self.parse({"groups": {"office": OFFICE, "team": TEAM,
                                      "ops": {"type": "password", "user": "ops", "password": "pw"}}})
        self.assertEqual(challenge_kinds(pset, self.registry), {"bearer", "basic"})
        self.assertEqual(challenge_kinds(self.parse({"groups": {"office": OFFICE}}), self.registry), set())
