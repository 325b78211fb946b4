"""The ``jwt`` group type: configuration, the usual attacks, and JWKS fetching."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from hoodyproxy.access.credentials import Credentials
from hoodyproxy.access.groups import InvalidPermissions
from hoodyproxy.access.groups.jwt import JWTGroup

SECRET = "an HS256 secret of at least 32 bytes, made for tests"
ISSUER = "https://idp.example"
AUDIENCE = "hoodyproxy"


@functools.cache
def rsa_key(name: str = "main") -> rsa.RSAPrivateKey:
    """An RSA private key per name, made once per test run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def claims(**overrides) -> dict:
    now = int(time.time())
    payload = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
               "role": "admin"}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token: str) -> Credentials:
    return Credentials("192.0.2.1", bearer=token)


class JWTParseTests(unittest.TestCase):
    group = JWTGroup()

    def parse(self, **spec):
        return self.group.parse({"type": "jwt", **spec}, "groups.sso")

    def assertInvalid(self, field, **spec):
        error = self.assertRaises(InvalidPermissions, self.parse, **spec)
        self.assertEqual(error.field, field)
        return error

    def test_secret_config(self):
        """A secret config is stored with its defaults made explicit."""
        self.assertEqual(self.parse(secret=SECRET, algorithms=["HS256"]),
                         {"type": "jwt", "secret": SECRET, "algorithms": ["HS256"], "leeway": 0})

    def test_full_config_round_trip(self):
        """Every option is kept and the stored form parses to itself."""
        stored = self.parse(public_key=public_pem(rsa_key()), algorithms=["RS256", "PS256"],
                            issuer=ISSUER, audience=[AUDIENCE, "other"], leeway=30,
                            claims={"role": ["admin", "ops"], "verified": True})
        self.assertEqual(self.group.parse(stored, "groups.sso"), stored)

    def test_jwks_round_trip(self):
        """A JWKS config's stored form parses to itself."""
        stored = self.parse(jwks_url="https://idp.example/.well-known/jwks.json",
                            algorithms=["RS256", "ES256"])
        self.assertEqual(self.group.parse(stored, "groups.sso"), stored)

    def test_redact_hides_secret(self):
        """The admin API does not show the HMAC secret."""
        shown = self.group.redact(self.parse(secret=SECRET, algorithms=["HS256"]))
        self.assertEqual(shown["secret"], "***")
        self.assertNotIn(SECRET, json.dumps(shown))

    def test_redact_shows_public_key_and_url(self):
        """A public key and a JWKS URL are no secrets: the admin API shows them."""
        stored = self.parse(public_key=public_pem(rsa_key()), algorithms=["RS256"])
        self.assertEqual(self.group.redact(stored), stored)
        stored = self.parse(jwks_url="https://idp.example/jwks", algorithms=["RS256"])
        self.assertEqual(self.group.redact(stored), stored)

    def test_algorithms_required(self):
        """algorithms is required: the token never chooses."""
        self.assertInvalid("groups.sso.algorithms", secret=SECRET)

    def test_algorithms_empty(self):
        """An empty algorithms list is refused."""
        self.assertInvalid("groups.sso.algorithms", secret=SECRET, algorithms=[])

    def test_algorithm_none(self):
        """The 'none' algorithm is refused, in any case."""
        for none in ("none", "None", "NONE"):
            self.assertInvalid("groups.sso.algorithms[1]", secret=SECRET,
                               algorithms=["HS256", none])

    def test_unknown_algorithm(self):
        """An algorithm outside the allow-list is refused."""
        self.assertInvalid("groups.sso.algorithms[0]", secret=SECRET, algorithms=["HS1"])

    def test_hmac_with_public_key(self):
        """HS* with a public key (the confusion attack's configuration) is refused."""
        self.assertInvalid("groups.sso.algorithms[1]", public_key=public_pem(rsa_key()),
                           algorithms=["RS256", "HS256"])

    def test_asymmetric_with_secret(self):
        """RS*/ES* with a secret is refused."""
        self.assertInvalid("groups.sso.algorithms[0]", secret=SECRET, algorithms=["RS256"])

    def test_duplicate_algorithm(self):
        """An algorithm listed twice is refused."""
        self.assertInvalid("groups.sso.algorithms[1]", secret=SECRET,
                           algorithms=["HS256", "HS256"])

    def test_no_key(self):
        """One of secret, public_key or jwks_url is needed."""
        self.assertInvalid("groups.sso", algorithms=["RS256"])

    def test_two_keys(self):
        """secret, public_key and jwks_url exclude one another."""
        self.assertInvalid("groups.sso.jwks_url", public_key=public_pem(rsa_key()),
                           jwks_url="https://idp.example/jwks", algorithms=["RS256"])

    def test_short_secret(self):
        """A secret shorter than the hash (32 bytes for HS256, 64 for HS512) is refused."""
        self.assertInvalid("groups.sso.secret", secret="x" * 31, algorithms=["HS256"])
        self.assertInvalid("groups.sso.secret", secret="x" * 63, algorithms=["HS256", "HS512"])

    def test_key_as_secret(self):
        """A public key given as an HMAC secret is refused (the key-confusion setup)."""
        self.assertInvalid("groups.sso.secret", secret=public_pem(rsa_key()), algorithms=["HS256"])

    def test_private_key(self):
        """A private key given as public_key is refused (redact would show it)."""
        pem = rsa_key().private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        self.assertInvalid("groups.sso.public_key", public_key=pem, algorithms=["RS256"])

    def test_not_a_key(self):
        """A public_key that is not a key is refused."""
        self.assertInvalid("groups.sso.public_key", public_key="-----BEGIN PUBLIC KEY-----\nxx",
                           algorithms=["RS256"])

    def test_key_of_wrong_family(self):
        """An RSA key with ES256 is refused."""
        self.assertInvalid("groups.sso.public_key", public_key=public_pem(rsa_key()),
                           algorithms=["ES256"])

    def test_weak_rsa_key(self):
        """An RSA key under 2048 bits is refused."""
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertInvalid("groups.sso.public_key", public_key=public_pem(weak),
                           algorithms=["RS256"])

    def test_jwks_url_plain_http(self):
        """A JWKS over plain http is refused, except on loopback."""
        self.assertInvalid("groups.sso.jwks_url", jwks_url="http://idp.example/jwks",
                           algorithms=["RS256"])
        self.parse(jwks_url="http://127.0.0.1:8080/jwks", algorithms=["RS256"])

    def test_jwks_url_with_credentials(self):
        """A JWKS URL with credentials in it is refused (the admin API shows the URL)."""
        self.assertInvalid("groups.sso.jwks_url", jwks_url="https://u:p@idp.example/jwks",
                           algorithms=["RS256"])

    def test_jwks_url_not_http(self):
        """A JWKS URL of another scheme is refused."""
        self.assertInvalid("groups.sso.jwks_url", jwks_url="file:///etc/jwks.json",
                           algorithms=["RS256"])

    def test_leeway_bounds(self):
        """leeway is a number of seconds from 0 to 300."""
        for bad in (-1, 301, True, "5"):
            self.assertInvalid("groups.sso.leeway", secret=SECRET, algorithms=["HS256"],
                               leeway=bad)

    def test_empty_audience(self):
        """An empty audience list is refused."""
        self.assertInvalid("groups.sso.audience", secret=SECRET, algorithms=["HS256"],
                           audience=[])

    def test_issuer_must_be_string(self):
        """issuer must be a non-empty string."""
        self.assertInvalid("groups.sso.issuer", secret=SECRET, algorithms=["HS256"], issuer=7)

    def test_reserved_claim(self):
        """exp, nbf, iat, iss and aud cannot be listed in claims."""
        self.assertInvalid("groups.sso.claims.exp", secret=SECRET, algorithms=["HS256"],
                           claims={"exp": 1})

    def test_claim_value_type(self):
        """A claim's value is a string, number or boolean, or a non-empty list of them."""
        self.assertInvalid("groups.sso.claims.role", secret=SECRET, algorithms=["HS256"],
                           claims={"role": {"admin": True}})
        self.assertInvalid("groups.sso.claims.role", secret=SECRET, algorithms=["HS256"],
                           claims={"role": []})
        self.assertInvalid("groups.sso.claims.role[1]", secret=SECRET, algorithms=["HS256"],
                           claims={"role": ["a", None]})

    def test_unknown_key(self):
        """An unknown key is refused and named."""
        self.assertInvalid("groups.sso.verify", secret=SECRET, algorithms=["HS256"],
                           verify=False)


class JWTCheckTests(unittest.TestCase):
    group = JWTGroup()

    def hs256(self, **spec):
        return self.group.parse({"type": "jwt", "secret": SECRET, "algorithms": ["HS256"],
                                 "issuer": ISSUER, "audience": AUDIENCE, **spec}, "g")

    def rs256(self, **spec):
        return self.group.parse({"type": "jwt", "public_key": public_pem(rsa_key()),
                                 "algorithms": ["RS256"], "issuer": ISSUER,
                                 "audience": AUDIENCE, **spec}, "g")

    def check(self, stored, token):
        return self.group.check(stored, bearer(token))

    def signed_hs256(self, **overrides):
        return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")

    def signed_rs256(self, **overrides):
        return jwt.encode(claims(**overrides), rsa_key(), algorithm="RS256")

    def test_valid_hs256(self):
        """A valid HS256 token passes."""
        self.assertIs(self.check(self.hs256(), self.signed_hs256()), True)

    def test_valid_rs256(self):
        """A valid RS256 token passes."""
        self.assertIs(self.check(self.rs256(), self.signed_rs256()), True)

    def test_other_rsa_key(self):
        """An RS256 token signed by another key fails."""
        token = jwt.encode(claims(), rsa_key("other"), algorithm="RS256")
        self.assertFalse(self.check(self.rs256(), token))

    def test_alg_none(self):
        """An unsigned token (alg none) fails."""
        token = jwt.encode(claims(), None, algorithm="none")
        self.assertFalse(self.check(self.hs256(), token))
        self.assertFalse(self.check(self.rs256(), token))

    def test_hs256_signed_with_public_key(self):
        """An HS256 token whose HMAC key is the RSA public key's PEM fails an RS256 config."""
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims()).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = hmac.new(public_pem(rsa_key()).encode(), signing_input, hashlib.sha256)
        self.assertFalse(self.check(self.rs256(), f"{header}.{payload}."
                                                  f"{b64url(signature.digest())}"))

    def test_expired(self):
        """An expired token fails."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(exp=int(time.time()) - 5)))

    def test_leeway(self):
        """Within the configured leeway, a just-expired token still passes."""
        token = self.signed_hs256(exp=int(time.time()) - 5)
        self.assertTrue(self.check(self.hs256(leeway=60), token))

    def test_not_yet_valid(self):
        """A token whose nbf is in the future fails."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(nbf=int(time.time()) + 60)))

    def test_missing_exp(self):
        """A token without exp fails: every token must expire."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(exp=None)))

    def test_wrong_issuer(self):
        """A token from another issuer fails."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(iss="https://evil.example")))

    def test_missing_issuer(self):
        """A token without iss fails when an issuer is configured."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(iss=None)))

    def test_wrong_audience(self):
        """A token for another audience fails."""
        self.assertFalse(self.check(self.hs256(), self.signed_hs256(aud="another-service")))

    def test_audience_list(self):
        """A token whose audience is one of the configured ones passes."""
        stored = self.hs256(audience=["a", AUDIENCE])
        self.assertTrue(self.check(stored, self.signed_hs256(aud=[AUDIENCE, "x"])))

    def test_missing_claim(self):
        """A token without a required claim fails."""
        stored = self.hs256(claims={"role": "admin"})
        self.assertFalse(self.check(stored, self.signed_hs256(role=None)))

    def test_wrong_claim(self):
        """A token with a wrong value for a required claim fails."""
        stored = self.hs256(claims={"role": "admin"})
        self.assertFalse(self.check(stored, self.signed_hs256(role="guest")))
        self.assertTrue(self.check(stored, self.signed_hs256(role="admin")))

    def test_claim_list_membership(self):
        """A claim configured as a list accepts any one of its values, and nothing else."""
        stored = self.hs256(claims={"role": ["admin", "ops"]})
        self.assertTrue(self.check(stored, self.signed_hs256(role="ops")))
        self.assertFalse(self.check(stored, self.signed_hs256(role="dev")))

    def test_token_claim_list(self):
        """A token claim that is a list (groups) matches when it holds an allowed value."""
        stored = self.hs256(claims={"groups": "staff"})
        self.assertTrue(self.check(stored, self.signed_hs256(groups=["dev", "staff"])))
        self.assertFalse(self.check(stored, self.signed_hs256(groups=["dev"])))

    def test_claim_types_are_strict(self):
        """True does not match 1, and "1" does not match 1."""
        self.assertFalse(self.check(self.hs256(claims={"level": 1}),
                                    self.signed_hs256(level=True)))
        self.assertFalse(self.check(self.hs256(claims={"level": 1}), self.signed_hs256(level="1")))
        self.assertTrue(self.check(self.hs256(claims={"level": 1}), self.signed_hs256(level=1)))

    def test_tampered_payload(self):
        """A payload changed after signing (original signature kept) fails."""
        header, _, signature = self.signed_rs256(role="guest").split(".")
        forged = b64url(json.dumps(claims(role="admin")).encode())
        stored = self.rs256(claims={"role": "admin"})
        self.assertFalse(self.check(stored, f"{header}.{forged}.{signature}"))

    def test_not_a_jwt(self):
        """A bearer token that is not a JWT, or no bearer token, does not match."""
        stored = self.hs256()
        for token in ("static-token-0123456789", "a.b.c", "", None):
            self.assertFalse(self.group.check(stored, Credentials("192.0.2.1", bearer=token)))

    def test_basic_credentials_do_not_match(self):
        """A valid JWT offered as a Basic password does not match."""
        credentials = Credentials("192.0.2.1", basic=("alice", self.signed_hs256()))
        self.assertFalse(self.group.check(self.hs256(), credentials))


class JWKSResource(Resource):
    """A JWKS endpoint that counts its requests; ``keys`` and ``status`` can change."""

    isLeaf = True

    def __init__(self, keys):
        super().__init__()
        self.keys = keys
        self.status = 200
        self.body = None  # bytes to serve instead of the keys
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()


def jwk(key, kid: str) -> dict:
    """The public JWK of a private key, with a kid."""
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return dict(data, kid=kid, use="sig")


class JWKSTests(unittest.TestCase):
    def setUp(self):
        self.resource = JWKSResource([jwk(rsa_key("k1"), "k1"), jwk(rsa_key("k2"), "k2")])
        site = Site(self.resource)
        site.timeOut = None  # no idle timer left in the reactor by the test's connections
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clock = task.Clock()
        self.group = JWTGroup(clock=self.clock)
        self.stored = self.group.parse(
            {"type": "jwt", "jwks_url": f"http://127.0.0.1:{self.port.getHost().port}/jwks",
             "algorithms": ["RS256", "ES256"], "audience": AUDIENCE}, "g")

    def token(self, key_name: str, kid: str | None, algorithm: str = "RS256", key=None) -> str:
        headers = {} if kid is None else {"kid": kid}
        return jwt.encode(claims(), key or rsa_key(key_name), algorithm=algorithm,
                          headers=headers)

    def check(self, token: str):
        return defer.maybeDeferred(self.group.check, self.stored, bearer(token))

    @defer.inlineCallbacks
    def test_kid_selects_key(self):
        """A token verifies with the key its kid names, and not with another key."""
        self.assertTrue((yield self.check(self.token("k2", "k2"))))
        self.assertFalse((yield self.check(self.token("k1", "k2"))))
        self.assertEqual(self.resource.requests, 1)

    @defer.inlineCallbacks
    def test_keys_cached(self):
        """Further tokens are checked from the cached key set, without a fetch."""
        for _ in range(3):
            self.assertTrue((yield self.check(self.token("k1", "k1"))))
        self.assertEqual(self.resource.requests, 1)

    @defer.inlineCallbacks
    def test_unknown_kid_refetch_bounded(self):
        """Tokens with unknown kids cause at most one fetch per minute per URL."""
        self.assertTrue((yield self.check(self.token("k1", "k1"))))
        for _ in range(3):
            self.assertFalse((yield self.check(self.token("k1", "bogus"))))
        self.assertEqual(self.resource.requests, 1)  # the first fetch opened the window
        self.clock.advance(61)
        results = yield defer.gatherResults([self.check(self.token("k1", f"bogus{i}"))
                                             for i in range(5)])
        self.assertEqual(results, [False] * 5)
        for _ in range(3):
            self.assertFalse((yield self.check(self.token("k1", "bogus"))))
        self.assertEqual(self.resource.requests, 2)
        self.clock.advance(61)
        self.assertFalse((yield self.check(self.token("k1", "bogus"))))
        self.assertEqual(self.resource.requests, 3)

    @defer.inlineCallbacks
    def test_rotated_key_found(self):
        """A key added to the JWKS is found by a refetch on its unknown kid."""
        self.assertTrue((yield self.check(self.token("k1", "k1"))))
        self.resource.keys.append(jwk(rsa_key("k3"), "k3"))
        self.clock.advance(61)
        self.assertTrue((yield self.check(self.token("k3", "k3"))))
        self.assertEqual(self.resource.requests, 2)

    @defer.inlineCallbacks
    def test_ec_key(self):
        """An ES256 token verifies with an EC key from the JWKS."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.resource.keys.append(jwk(key, "ec1"))
        self.assertTrue((yield self.check(self.token("", "ec1", "ES256", key))))

    @defer.inlineCallbacks
    def test_algorithm_outside_config_fetches_nothing(self):
        """A token whose alg the config does not allow fails before any fetch."""
        token = jwt.encode(claims(), "x" * 32, algorithm="HS256", headers={"kid": "k1"})
        self.assertFalse((yield self.check(token)))
        self.assertEqual(self.resource.requests, 0)

    @defer.inlineCallbacks
    def test_no_kid_with_one_key(self):
        """A token without kid verifies when the JWKS holds exactly one usable key."""
        self.resource.keys = [jwk(rsa_key("k1"), "k1")]
        self.assertTrue((yield self.check(self.token("k1", None))))

    @defer.inlineCallbacks
    def test_no_kid_with_several_keys(self):
        """A token without kid does not match when the JWKS holds several keys."""
        self.assertFalse((yield self.check(self.token("k1", None))))

    @defer.inlineCallbacks
    def test_fetch_failure(self):
        """A JWKS that cannot be fetched (HTTP 500) means no match."""
        self.resource.status = 500
        self.assertFalse((yield self.check(self.token("k1", "k1"))))

    @defer.inlineCallbacks
    def test_not_a_jwks(self):
        """A JWKS URL that serves something else (HTML, an empty set) means no match."""
        for body in (b"<html>login</html>", b'{"keys": []}'):
            self.clock.advance(61)
            self.resource.body = body
            self.assertFalse((yield self.check(self.token("k1", "k1"))))

    @defer.inlineCallbacks
    def test_oversized_jwks(self):
        """A JWKS response over 1 MiB is not read whole: no match."""
        self.resource.body = b" " * (2 * 1024 * 1024) + json.dumps({"keys": self.resource.keys}).encode()
        self.assertFalse((yield self.check(self.token("k1", "k1"))))

    @defer.inlineCallbacks
    def test_concurrent_checks_share_one_fetch(self):
        """Checks arriving while the JWKS is being fetched wait for that one fetch."""
        results = yield defer.gatherResults([self.check(self.token("k1", "k1")) for _ in range(5)])
        self.assertEqual(results, [True] * 5)
        self.assertEqual(self.resource.requests, 1)

    @defer.inlineCallbacks
    def test_unreachable_jwks(self):
        """A JWKS server that refuses connections means no match."""
        yield self.port.stopListening()
        self.assertFalse((yield self.check(self.token("k1", "k1"))))

    @defer.inlineCallbacks
    def test_stale_keys_kept_when_refresh_fails(self):
        """When an old key set cannot be refreshed, its keys still verify."""
        self.assertTrue((yield self.check(self.token("k1", "k1"))))
        self.resource.status = 500
        self.clock.advance(301)
        self.assertTrue((yield self.check(self.token("k1", "k1"))))
        self.assertEqual(self.resource.requests, 2)

    @defer.inlineCallbacks
    def test_stale_keys_refreshed(self):
        """A key set older than five minutes is fetched again: a removed key stops working."""
        self.assertTrue((yield self.check(self.token("k1", "k1"))))
        self.resource.keys = [jwk(rsa_key("k2"), "k2")]
        self.clock.advance(301)
        self.assertFalse((yield self.check(self.token("k1", "k1"))))
        self.assertEqual(self.resource.requests, 2)
