"""JWT verification (rules 113-133, Epic §3.3) with real signed tokens and a real JWK Set server."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid

import pytest

from cds_service.trust.auth import TokenVerifier, VerifiedCaller
from cds_service.trust.errors import AuthError
from cds_service.trust.issuers import TrustedIssuer
from cds_service.trust.jwks import JwksCache
from cds_service.trust.replay import MemoryReplayCache
from cds_service.trust.settings import AuthSettings
from tests.conftest import example
from tests.helpers.jwks import (
    AUD,
    ISS,
    FakeClock,
    JwksServer,
    TestKey,
    b64url,
    ec_key,
    jwks,
    make_jwt,
    recording_session,
    rsa_key,
    signature_segment,
)

LOOPBACK = AuthSettings(allow_http_loopback_jku=True)
EPIC_KID = "d3bmo5HzW61TUgikHZH+A8Tx4UOXz2iOs4KvVU4eLY0="  # epic-jwt-header.json


@pytest.fixture(scope="module")
def rs() -> TestKey:
    return rsa_key()


@pytest.fixture(scope="module")
def es() -> TestKey:
    return ec_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_cache(clock):
    caches: list[JwksCache] = []

    def _make(settings: AuthSettings = LOOPBACK, session=None) -> JwksCache:
        caches.append(JwksCache(settings, session, clock=clock))
        return caches[-1]

    yield _make
    for cache in caches:
        cache.close()


@pytest.fixture
def make_verifier(jwks_server, make_cache):
    def _make(
        *,
        jku: tuple[str, ...] | None = None,
        jwks_set=None,
        algorithms=("RS384", "ES384"),
        audiences=(),
        settings=LOOPBACK,
        replay=None,
        iss=ISS,
    ) -> TokenVerifier:
        if jku is None:
            jku = () if jwks_set is not None else (jwks_server.url,)
        issuer = TrustedIssuer(iss=iss, site_id="hospital-a", jku=jku, jwks=jwks_set,
                               audiences=audiences, algorithms=algorithms)
        return TokenVerifier([issuer], replay or MemoryReplayCache(), settings,
                             make_cache(settings))

    return _make


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refused(verifier: TokenVerifier, token_or_header: str | None, endpoint: str = AUD) -> str:
    header = token_or_header
    if header is not None and header.count(".") == 2 and " " not in header:
        header = bearer(header)
    with pytest.raises(AuthError) as info:
        verifier.verify(header, endpoint)
    return info.value.reason


# -- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["rs", "es"])
def test_valid_token_via_jku(request, key_name, jwks_server, make_verifier):
    key = request.getfixturevalue(key_name)
    jwks_server.publish(request.getfixturevalue("rs"), request.getfixturevalue("es"))
    verifier = make_verifier()
    jti = str(uuid.uuid4())
    token = make_jwt(key, headers={"jku": jwks_server.url}, jti=jti)

    caller = verifier.verify(bearer(token), AUD)

    assert caller == VerifiedCaller(iss=ISS, site_id="hospital-a", sub=None, jti=jti,
                                    kid=key.kid, alg=key.alg, claims=caller.claims)
    assert caller.claims["aud"] == AUD
    assert jwks_server.requests == [JwksServer.DEFAULT_PATH]


@pytest.mark.parametrize("key_name", ["rs", "es"])
def test_valid_token_via_out_of_band_jwks(request, key_name, jwks_server,
                                          make_verifier):
    key = request.getfixturevalue(key_name)
    verifier = make_verifier(jwks_set=jwks(request.getfixturevalue("rs"),
                                           request.getfixturevalue("es")))

    caller = verifier.verify(bearer(make_jwt(key)), AUD)

    assert (caller.alg, caller.kid) == (key.alg, key.kid)
    assert jwks_server.count == 0


def test_epic_timing_nbf_300_s_before_iat_and_15_minute_lifetime(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    now = int(time.time())
    token = make_jwt(rs, iat=now, nbf=now - 300, exp=now + 900, sub="12345678-ce08-4ac7")

    caller = verifier.verify(bearer(token), AUD)

    assert caller.sub == "12345678-ce08-4ac7"
    assert caller.claims["nbf"] == now - 300


def test_epic_header_and_payload_shape(jwks_server, make_verifier):
    """epic-jwt-header.json / epic-jwt-payload.json, with {{Base URL}} pointed at loopback and
    the times moved to now: RS384, a jku on the EHR, a standard-base64 kid, sub and nbf, no
    tenant, and an aud the hospital typed in."""
    epic_header = example("epic-jwt-header.json")
    epic_payload = example("epic-jwt-payload.json")
    base_url = f"http://127.0.0.1:{jwks_server.port}"
    key = rsa_key(kid=epic_header["kid"])
    header = {name: value.replace("{{Base URL}}", base_url)
              for name, value in epic_header.items()}
    assert list(header) == ["alg", "jku", "kid", "typ"] and header["kid"] == EPIC_KID
    jwks_server.publish(key, path=header["jku"].removeprefix(base_url))
    now = int(time.time())
    shift = now - epic_payload["iat"]
    claims = {**epic_payload, "iss": epic_payload["iss"].replace("{{Base URL}}", base_url),
              "iat": now, "nbf": epic_payload["nbf"] + shift, "exp": epic_payload["exp"] + shift}
    verifier = make_verifier(iss=claims["iss"], jku=(header["jku"],),
                             audiences=(epic_payload["aud"],))

    caller = verifier.verify(bearer(make_jwt(key, headers=header, **claims)),
                             "https://cds.example.org/cds-services/kidney-risk")

    assert (caller.kid, caller.alg, caller.sub) == (EPIC_KID, "RS384", epic_payload["sub"])
    assert caller.iss == claims["iss"]


def test_kid_is_compared_as_an_exact_string(jwks_server, make_verifier):
    key = rsa_key(kid=EPIC_KID)
    jwks_server.publish(key)
    verifier = make_verifier()
    assert verifier.verify(bearer(make_jwt(key, headers={"jku": jwks_server.url})), AUD)
    # The base64url spelling of the same bytes is another kid.
    urlsafe = EPIC_KID.replace("+", "-").rstrip("=")
    assert refused(verifier, make_jwt(key.with_kid(urlsafe),
                                      headers={"jku": jwks_server.url})) == "kid"


def test_rsa_jwk_without_alg_verifies_rs384(jwks_server, make_verifier):
    key = rsa_key()
    published = {k: v for k, v in key.public_jwk.items() if k != "alg"}
    jwks_server.publish(published)
    caller = make_verifier().verify(bearer(make_jwt(key, headers={"jku": jwks_server.url})), AUD)
    assert caller.alg == "RS384"


def test_issuer_with_jku_and_jwks_uses_the_jku_when_the_token_names_one(jwks_server,
                                                                        make_verifier):
    out_of_band, published = rsa_key(), rsa_key()
    jwks_server.publish(published)
    verifier = make_verifier(jku=(jwks_server.url,), jwks_set=jwks(out_of_band))

    assert verifier.verify(bearer(make_jwt(published, headers={"jku": jwks_server.url})), AUD)
    assert verifier.verify(bearer(make_jwt(out_of_band)), AUD)
    # A kid that is only in the out-of-band set is not looked up when the token names a jku.
    assert refused(verifier, make_jwt(out_of_band, headers={"jku": jwks_server.url})) == "kid"


def test_extra_claims_never_cause_rejection(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = make_jwt(rs, sub=12345, tenant="2ddd6c3a-8e9a-44c6-a305-52111ad302a2",
                     nbf=int(time.time()) - 300, fhirUser="Practitioner/1")
    caller = verifier.verify(bearer(token), AUD)
    assert caller.sub is None
    assert caller.claims["tenant"] == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"


@pytest.mark.parametrize("header", ["Bearer {}", "bearer {}", "BEARER {}", "  Bearer   {}  "])
def test_bearer_scheme_is_case_insensitive(rs, make_verifier, header):
    verifier = make_verifier(jwks_set=jwks(rs))
    assert verifier.verify(header.format(make_jwt(rs)), AUD).kid == rs.kid


@pytest.mark.parametrize("typ", ["JWT", "jwt", "Jwt"])
def test_typ_jwt_in_any_case(rs, make_verifier, typ):
    verifier = make_verifier(jwks_set=jwks(rs))
    assert verifier.verify(bearer(make_jwt(rs, headers={"typ": typ})), AUD)


# -- algorithms -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_refused_before_any_key_lookup(rs, jwks_server, make_verifier, alg):
    jwks_server.publish(rs)
    token = make_jwt(None, headers={"alg": alg, "kid": rs.kid, "jku": jwks_server.url})
    assert refused(make_verifier(), token) == "alg"
    assert jwks_server.count == 0


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_keyed_with_the_rsa_public_key_is_refused(rs, jwks_server, make_verifier,
                                                       alg):
    """The classic confusion: the verifier's own public key PEM used as an HMAC secret."""
    jwks_server.publish(rs)
    token = make_jwt(rs.public_pem, headers={"alg": alg, "kid": rs.kid, "jku": jwks_server.url})
    assert refused(make_verifier(), token) == "alg"
    assert jwks_server.count == 0
    # Same with the out-of-band key set (no jku header).
    token = make_jwt(rs.public_pem, headers={"alg": alg, "kid": rs.kid})
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "alg"


def test_alg_none_is_refused_before_the_issuer_is_even_looked_up(make_verifier):
    token = make_jwt(None, headers={"kid": "k"}, iss="https://unknown.example.org")
    assert refused(make_verifier(), token) == "alg"


def test_alg_missing_is_refused(rs, make_verifier):
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, headers={"alg": None})) == "alg"


def test_rs256_refused_unless_allow_listed(make_verifier):
    key = rsa_key(alg="RS256")
    token = make_jwt(key)
    assert refused(make_verifier(jwks_set=jwks(key)), token) == "alg"
    caller = make_verifier(jwks_set=jwks(key), algorithms=("RS256",)).verify(bearer(token), AUD)
    assert caller.alg == "RS256"


def test_alg_must_match_the_keys_type_curve_and_declared_alg(rs, es, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs, es),
                             algorithms=("RS256", "RS384", "ES256", "ES384", "PS384"))
    # RS384-signed token naming the EC key's kid.
    assert refused(verifier, make_jwt(rs, headers={"kid": es.kid})) == "key"
    # ES256 with a P-384 key.
    assert refused(verifier, make_jwt(ec_key(kid=es.kid, alg="ES256"))) == "key"
    # RS256 / PS384 with a key published as RS384.
    assert refused(verifier, make_jwt(rs, headers={"alg": "RS256"})) == "key"
    assert refused(verifier, make_jwt(rs, headers={"alg": "PS384"})) == "key"


def test_short_rsa_keys_are_refused():
    weak = rsa_key(bits=1024)
    verifier = TokenVerifier([TrustedIssuer(ISS, "a", jwks=jwks(weak))], MemoryReplayCache())
    with pytest.raises(AuthError) as info:
        verifier.verify(bearer(make_jwt(weak)), AUD)
    assert info.value.reason == "key"


# -- the spec's own example token -----------------------------------------------------------


def spec_verifier():
    """Trusts the CDS Hooks 2.0 example issuer; its jku is answered by an in-process transport
    serving the spec's JWK Set (no network)."""
    header = example("cdshooks-2.0-jwt-header.json")
    payload = example("cdshooks-2.0-jwt-payload.json")
    session, adapter = recording_session({header["jku"]: example("cdshooks-2.0-jwks-public.json")})
    issuer = TrustedIssuer(iss=payload["iss"], site_id="spec", jku=(header["jku"],))
    verifier = TokenVerifier([issuer], MemoryReplayCache(), AuthSettings(),
                             JwksCache(AuthSettings(), session))
    token = example("cdshooks-2.0-jwt-compact-authorization-header.json")["authorization_header"]
    return verifier, adapter, token, payload["aud"]


def test_spec_example_token_verifies_then_fails_as_expired():
    verifier, adapter, authorization, aud = spec_verifier()
    assert refused(verifier, authorization, aud) == "exp"
    assert adapter.sent == [example("cdshooks-2.0-jwt-header.json")["jku"]]


def test_spec_example_token_with_a_tampered_signature_or_payload_fails_signature():
    verifier, _, authorization, aud = spec_verifier()
    head, payload, signature = authorization.removeprefix("Bearer ").split(".")
    flipped = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    assert refused(verifier, f"{head}.{payload}.{flipped}", aud) == "signature"
    claims = example("cdshooks-2.0-jwt-payload.json") | {"exp": int(time.time()) + 300}
    forged = b64url(json.dumps(claims).encode())
    assert refused(verifier, f"{head}.{forged}.{signature}", aud) == "signature"


# -- claims ---------------------------------------------------------------------------------


def test_expired_token(rs, make_verifier):
    now = int(time.time())
    token = make_jwt(rs, iat=now - 900, exp=now - 60)
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "exp"


def test_exp_within_leeway_is_accepted(rs, make_verifier):
    now = int(time.time())
    assert make_verifier(jwks_set=jwks(rs)).verify(
        bearer(make_jwt(rs, iat=now - 300, exp=now - 10)), AUD)


def test_iat_in_the_future(rs, make_verifier):
    now = int(time.time())
    verifier = make_verifier(jwks_set=jwks(rs))
    assert refused(verifier, make_jwt(rs, iat=now + 600, exp=now + 900)) == "iat"
    assert verifier.verify(bearer(make_jwt(rs, iat=now + 10, exp=now + 300)), AUD)  # clock skew


def test_nbf_ahead(rs, make_verifier):
    now = int(time.time())
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, nbf=now + 120)) == "nbf"


def test_lifetime_beyond_one_hour(rs, make_verifier):
    now = int(time.time())
    verifier = make_verifier(jwks_set=jwks(rs))
    assert refused(verifier, make_jwt(rs, iat=now, exp=now + 3601)) == "lifetime"
    assert verifier.verify(bearer(make_jwt(rs, iat=now, exp=now + 3600)), AUD)


@pytest.mark.parametrize("claim", ["aud", "exp", "iat", "jti"])
def test_required_claims(rs, make_verifier, claim):
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, **{claim: None})) == claim


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": "9999999999"}, "exp"),
        ({"exp": True}, "exp"),
        ({"iat": "0"}, "iat"),
        ({"nbf": "soon"}, "nbf"),
        ({"jti": ""}, "jti"),
        ({"jti": 42}, "jti"),
        ({"jti": "x" * 600}, "jti"),
    ],
)
def test_claims_of_the_wrong_type(rs, make_verifier, claims, reason):
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, **claims)) == reason


@pytest.mark.parametrize(
    ("aud", "ok"),
    [
        (AUD, True),
        (AUD + "/", True),
        ([AUD], True),
        (["https://other.example.org/", AUD], True),
        ("https://cds.example.org/cds-services/other-service", False),
        (["https://cds.example.org/cds-services/other-service"], False),
        ("https://cds.example.org/cds-services", False),
        ([], False),
        (42, False),
        ([AUD, 42], False),
    ],
)
def test_aud_names_this_endpoint(rs, make_verifier, aud, ok):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = make_jwt(rs, aud=aud)
    if ok:
        assert verifier.verify(bearer(token), AUD)
    else:
        assert refused(verifier, token) == "aud"


def test_endpoint_url_with_a_trailing_slash_matches(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    assert verifier.verify(bearer(make_jwt(rs, aud=AUD)), AUD + "/")


def test_configured_audience_is_accepted(rs, make_verifier):
    typed_in = "https://example.com/savecdshooksrequest"
    verifier = make_verifier(jwks_set=jwks(rs), audiences=(typed_in + "/",))
    assert verifier.verify(bearer(make_jwt(rs, aud=typed_in)), AUD)
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, aud=typed_in)) == "aud"


def test_unknown_issuer(rs, jwks_server, make_verifier):
    jwks_server.publish(rs)
    verifier = make_verifier()
    for iss in ("https://evil.example.org/api/FHIR/R4", ISS + "/", None, ["x"]):
        assert refused(verifier, make_jwt(rs, iss=iss, headers={"jku": jwks_server.url})) == "iss"
    assert jwks_server.count == 0


# -- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("   ", "missing"),
        ("Basic dXNlcjpwYXNz", "scheme"),
        ("Bearer", "malformed"),
        ("Bearer not-a-jwt", "malformed"),
        ("Bearer a.b.c", "malformed"),
        ("Bearer a.b c.d", "malformed"),
    ],
)
def test_authorization_header_shape(rs, make_verifier, authorization, reason):
    assert refused(make_verifier(jwks_set=jwks(rs)), authorization) == reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"kid": None}, "kid"),
        ({"kid": ""}, "kid"),
        ({"kid": 7}, "malformed"),  # PyJWT refuses a non-string kid while parsing the header
        ({"typ": None}, "typ"),
        ({"typ": "JOSE"}, "typ"),
        ({"typ": "at+jwt"}, "typ"),
        ({"crit": ["exp"], "exp": 1}, "crit"),
    ],
)
def test_jose_header_rules(rs, make_verifier, headers, reason):
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, headers=headers)) == reason


@pytest.mark.parametrize(
    "headers",
    [
        {"crit": ["urn:example:must-understand"], "urn:example:must-understand": True},
        {"crit": ["b64"], "b64": False},  # RFC 7797 unencoded payload: not implemented here
        {"crit": ["http://openbanking.org.uk/iat"], "http://openbanking.org.uk/iat": 1},
        {"crit": []},  # RFC 7515 §4.1.11: an empty list is itself invalid
        {"crit": "urn:example:not-a-list"},
    ],
)
def test_a_token_marking_any_extension_critical_is_refused(rs, make_verifier, headers):
    # RFC 7515 §4.1.11: a validly signed token whose critical extension we do not understand
    # must be rejected, not verified as if the extension were absent.
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, headers=headers)) == "crit"


def test_the_pyjwt_in_use_refuses_unknown_critical_extensions_too(rs):
    # The dependency floor (PyJWT>=2.12 in pyproject.toml): earlier releases verified such a
    # token. auth.py refuses `crit` before PyJWT sees it; this keeps the second line of defence.
    import jwt

    token = make_jwt(rs, headers={"crit": ["urn:example:x"], "urn:example:x": True})
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(token, jwt.PyJWK(rs.public_jwk).key, algorithms=[rs.alg],
                   options={"verify_aud": False})


def test_embedded_jwk_header_is_never_used(rs, make_verifier):
    attacker = rsa_key()
    token = make_jwt(attacker, headers={"jwk": attacker.public_jwk})
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "kid"
    # Even reusing a trusted kid, the signature is checked against the trusted key.
    token = make_jwt(attacker.with_kid(rs.kid), headers={"jwk": attacker.public_jwk})
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "signature"


# -- the compact serialisation (RFC 7515 §7.1), as strictly as PyJWT parses it ------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _segments(token: str) -> list[str]:
    return token.split(".")


def _with_segment(token: str, index: int, segment: str) -> str:
    parts = _segments(token)
    parts[index] = segment
    return ".".join(parts)


def _token_with_partial_quanta(key: TestKey) -> str:
    """A valid token each of whose three segments ends in a 2- or 3-character group."""
    for pad in range(16):
        token = make_jwt(key, headers={"x": "a" * (pad % 4)}, x="b" * (pad // 4))
        if all(len(segment) % 4 in (2, 3) for segment in _segments(token)):
            return token
    raise AssertionError("no padding combination found")


def _non_canonical(segment: str) -> str:
    """The same bytes with an unused low bit of the last character set (RFC 4648 §3.5)."""
    return segment[:-1] + _ALPHABET[_ALPHABET.index(segment[-1]) | 1]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_non_canonical_base64url_segments_are_malformed(rs, make_verifier, index):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = _token_with_partial_quanta(rs)
    # The lenient decoder reads the same bytes, so the signature would verify.
    assert refused(verifier, _with_segment(token, index, _non_canonical(_segments(token)[index]))) \
        == "malformed"
    assert verifier.verify(bearer(token), AUD)


def test_padding_that_completes_the_last_quantum_is_accepted_as_pyjwt_does(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = _token_with_partial_quanta(rs)
    signature = signature_segment(token)
    padded = _with_segment(token, 2, signature + "=" * (-len(signature) % 4))
    assert verifier.verify(bearer(padded), AUD)
    # Padding the header or payload changes the signing input itself.
    head = _segments(token)[0]
    assert refused(verifier, _with_segment(token, 0, head + "=" * (-len(head) % 4))) \
        == "signature"


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("padding", ["wrong", "three", "middle"])
def test_bad_padding_is_malformed(rs, make_verifier, index, padding):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = _token_with_partial_quanta(rs)
    segment = _segments(token)[index]
    missing = -len(segment) % 4
    bad = {
        "wrong": segment + "=" * (3 - missing),  # 1 where 2 are needed, or 2 where 1 is
        "three": segment + "===",
        "middle": segment[:4] + "=" + segment[5:],
    }[padding]
    assert refused(verifier, _with_segment(token, index, bad)) == "malformed"


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("character", ["+", "/", "!", "é", " "])
def test_characters_outside_the_base64url_alphabet_are_malformed(rs, make_verifier, index,
                                                                  character):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = make_jwt(rs)
    segment = _segments(token)[index]
    bad = segment[:8] + character + segment[9:]
    assert refused(verifier, bearer(_with_segment(token, index, bad))) == "malformed"


def test_signature_segment_of_impossible_length_is_malformed(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = make_jwt(rs)
    signature = signature_segment(token)
    cut = signature[: len(signature) - (len(signature) % 4) - 3]  # leaves 1 character over
    assert len(cut) % 4 == 1
    assert refused(verifier, _with_segment(token, 2, cut)) == "malformed"


@pytest.mark.parametrize("shape", ["two", "four", "trailing-dot", "leading-dot"])
def test_a_token_of_other_than_three_segments_is_malformed(rs, make_verifier, shape):
    token = make_jwt(rs)
    bad = {
        "two": token.rsplit(".", 1)[0],
        "four": token + "." + signature_segment(token),
        "trailing-dot": token + ".",
        "leading-dot": "." + token,
    }[shape]
    assert refused(make_verifier(jwks_set=jwks(rs)), bearer(bad)) == "malformed"


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (["alg", "RS384"], None),
        ("RS384", None),
        (None, ["iss"]),
        (None, 42),
        (None, "claims"),
    ],
)
def test_a_header_or_payload_that_is_not_a_json_object_is_malformed(rs, make_verifier, header,
                                                                     payload):
    head, body, signature = _segments(make_jwt(rs))
    if header is not None:
        head = b64url(json.dumps(header).encode())
    if payload is not None:
        body = b64url(json.dumps(payload).encode())
    assert refused(make_verifier(jwks_set=jwks(rs)), f"{head}.{body}.{signature}") == "malformed"


@pytest.mark.parametrize("segment", [0, 1])
def test_invalid_json_is_malformed(rs, make_verifier, segment):
    token = _with_segment(make_jwt(rs), segment, b64url(b'{"alg": "RS384",'))
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "malformed"


@pytest.mark.parametrize("key_name", ["rs", "es"])
def test_a_tampered_payload_or_header_fails_the_signature(request, key_name, make_verifier):
    key = request.getfixturevalue(key_name)
    verifier = make_verifier(jwks_set=jwks(key))
    token = make_jwt(key)
    head, body, signature = _segments(token)
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged = b64url(json.dumps(claims | {"exp": claims["exp"] + 60}).encode())
    assert refused(verifier, f"{head}.{forged}.{signature}") == "signature"
    other_head = make_jwt(key, headers={"x": 1}).split(".")[0]
    assert refused(verifier, f"{other_head}.{body}.{signature}") == "signature"
    assert verifier.verify(bearer(token), AUD)


@pytest.mark.parametrize("key_name", ["rs", "es"])
@pytest.mark.parametrize("change", ["empty", "truncated", "extended"])
def test_a_signature_of_the_wrong_length_fails_the_signature(request, key_name, make_verifier,
                                                            change):
    key = request.getfixturevalue(key_name)
    token = make_jwt(key)
    segment = signature_segment(token)
    signature = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    bad = {"empty": b"", "truncated": signature[:-3], "extended": signature + b"\0\0\0"}[change]
    assert refused(make_verifier(jwks_set=jwks(key)), _with_segment(token, 2, b64url(bad))) \
        == "signature"


def test_an_es384_signature_in_der_form_fails_the_signature(es, make_verifier):
    # RFC 7518 §3.4: the JWS form is r || s, never ASN.1 DER.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    token = make_jwt(es)
    signing_input = token.rsplit(".", 1)[0].encode()
    der = es.private.sign(signing_input, ec.ECDSA(hashes.SHA384()))
    assert refused(make_verifier(jwks_set=jwks(es)), _with_segment(token, 2, b64url(der))) \
        == "signature"


def test_an_unencoded_payload_is_malformed(rs, make_verifier):
    # RFC 7797 `b64: false` (without `crit`, which is refused first): PyJWT refuses it as well.
    verifier = make_verifier(jwks_set=jwks(rs))
    assert refused(verifier, make_jwt(rs, headers={"b64": False})) == "malformed"
    assert verifier.verify(bearer(make_jwt(rs, headers={"b64": True})), AUD)


def test_a_short_key_is_refused_after_the_token_is_parsed():
    weak = rsa_key(bits=1024)
    verifier = TokenVerifier([TrustedIssuer(ISS, "a", jwks=jwks(weak))], MemoryReplayCache())
    token = make_jwt(weak)
    assert refused(verifier, token) == "key"
    assert refused(verifier, _with_segment(token, 2, "!" + signature_segment(token)[1:])) \
        == "malformed"
    assert refused(verifier, make_jwt(weak, headers={"b64": False})) == "malformed"


def test_keys_are_bound_and_prepared_once_per_kid_and_alg(rs):
    from cds_service.trust.keys import BoundKey, KeySet

    keys = KeySet.parse(jwks(rs, rsa_key(bits=1024, kid="weak")), strict=True, where="test")
    bound = keys.bind(rs.kid, "RS384")
    assert isinstance(bound, BoundKey) and bound.usable
    assert keys.bind(rs.kid, "RS384") is bound
    assert bound.prepared.public_numbers() == rs.private.public_key().public_numbers()
    assert not keys.bind("weak", "RS384").usable


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": 5}, "iss"),
        ({"iss": True}, "iss"),
        ({"iss": {"url": ISS}}, "iss"),
        ({"aud": 5}, "aud"),
        ({"aud": {"url": AUD}}, "aud"),
        ({"aud": None, "exp": None}, "aud"),  # the first missing claim, in PyJWT's order
        ({"iat": None, "jti": None}, "iat"),
    ],
)
def test_claims_of_unknown_types(rs, make_verifier, claims, reason):
    assert refused(make_verifier(jwks_set=jwks(rs)), make_jwt(rs, **claims)) == reason


def test_the_segment_rule_matches_the_rfcs_and_the_pyjwt_in_use():
    # auth.py checks segments itself, as PyJWT's own parser does. The rule, written out from
    # RFC 7515 §2 (base64url, padding optional) and RFC 4648 §3.5 (canonical: the unused bits
    # of a last 2- or 3-character group are zero), and PyJWT's own decoder where this release
    # has one: if an upgrade changes what it accepts, this says so. Every string up to 6
    # characters over the boundary cases.
    import base64
    import itertools

    from jwt.api_jws import PyJWS
    from jwt.exceptions import DecodeError

    from cds_service.trust.auth import _SEGMENT

    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

    def rfc_accepts(segment: str) -> bool:
        body = segment.rstrip("=")
        padding = len(segment) - len(body)
        if not set(body) <= alphabet or len(body) % 4 == 1:
            return False
        if padding and padding != -len(body) % 4:  # `=` only completing the last group
            return False
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return base64.urlsafe_b64encode(raw).decode().rstrip("=") == body

    decode = getattr(PyJWS, "_decode_base64url_segment", None)  # PyJWT >= 2.15

    def pyjwt_accepts(segment: str) -> bool:
        try:
            decode(segment.encode(), "segment")
        except DecodeError:
            return False
        return True

    for length in range(7):
        for characters in itertools.product("AEQgwB_-/=+", repeat=length):
            segment = "".join(characters)
            assert bool(_SEGMENT.fullmatch(segment)) == rfc_accepts(segment), segment
            if decode is not None:
                assert rfc_accepts(segment) == pyjwt_accepts(segment), segment


# -- jku allow-list -------------------------------------------------------------------------


def test_jku_not_allow_listed_is_never_fetched(rs, jwks_server, make_verifier):
    jwks_server.publish(rs)
    jwks_server.publish(rs, path="/attacker/jwks")
    verifier = make_verifier()
    for jku in (jwks_server.url_for("/attacker/jwks"), jwks_server.url + "/",
                jwks_server.url.replace("127.0.0.1", "localhost"), ["x"]):
        assert refused(verifier, make_jwt(rs, headers={"jku": jku})) == "jku"
    assert jwks_server.count == 0


def test_http_jku_is_refused_without_any_request(rs, make_cache):
    session, adapter = recording_session()
    settings = AuthSettings()  # no loopback exception
    cache = make_cache(settings, session)
    issuer = TrustedIssuer(ISS, "a", jku=("https://ehr.example.org/jwks",), jwks=jwks(rs))
    verifier = TokenVerifier([issuer], MemoryReplayCache(), settings, cache)
    token = make_jwt(rs, headers={"jku": "http://ehr.example.org/jwks"})
    assert refused(verifier, token) == "jku"
    # The cache refuses it on its own too, should a caller skip the allow-list.
    for url in ("http://ehr.example.org/jwks", "http://127.0.0.1:9/jwks", "ftp://ehr.example.org/k",
                "https://user:pw@ehr.example.org/jwks", "https:///jwks"):
        with pytest.raises(AuthError) as info:
            cache.key(url, rs.kid)
        assert info.value.reason == "jku"
    assert adapter.sent == []


def test_issuer_with_only_jku_refuses_a_token_without_jku(rs, jwks_server,
                                                          make_verifier):
    jwks_server.publish(rs)
    assert refused(make_verifier(), make_jwt(rs)) == "jku"
    assert jwks_server.count == 0


# -- JWK Set cache --------------------------------------------------------------------------


def test_unknown_kid_refetches_once_then_is_rate_limited(rs, jwks_server, make_verifier,
                                                         clock):
    jwks_server.publish(rs)
    verifier = make_verifier()
    jku = {"jku": jwks_server.url}
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)
    assert jwks_server.count == 1

    clock.advance(61)
    assert refused(verifier, make_jwt(rsa_key(), headers=jku)) == "kid"
    assert jwks_server.count == 2  # exactly one refetch

    clock.advance(30)  # within the minimum interval
    assert refused(verifier, make_jwt(rsa_key(), headers=jku)) == "kid"
    assert jwks_server.count == 2
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)  # known kids still served
    assert jwks_server.count == 2


def test_key_rotation(rs, jwks_server, make_verifier, clock):
    jwks_server.publish(rs)
    verifier = make_verifier()
    jku = {"jku": jwks_server.url}
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)

    new = rsa_key()
    jwks_server.publish(new)  # the EHR rotates: only the new key is published
    clock.advance(61)
    assert verifier.verify(bearer(make_jwt(new, headers=jku)), AUD).kid == new.kid
    assert jwks_server.count == 2
    assert refused(verifier, make_jwt(rs, headers=jku)) == "kid"  # the old key is gone
    assert jwks_server.count == 2


def test_ttl_expiry_refetches_and_stale_keys_survive_a_failing_endpoint(rs, jwks_server,
                                                                        make_verifier, clock):
    jwks_server.publish(rs)
    verifier = make_verifier()
    jku = {"jku": jwks_server.url}
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)
    clock.advance(3601)
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)
    assert jwks_server.count == 2

    jwks_server.answer(JwksServer.DEFAULT_PATH, status=503)
    clock.advance(3601)
    assert verifier.verify(bearer(make_jwt(rs, headers=jku)), AUD)  # stale, endpoint down
    assert jwks_server.count == 3
    clock.advance(3601)
    assert refused(verifier, make_jwt(rs, headers=jku)) == "jku-fetch"
    assert jwks_server.count == 4


def test_concurrent_cold_lookups_fetch_once(rs, jwks_server, make_cache):
    jwks_server.answer(JwksServer.DEFAULT_PATH, body=json.dumps(jwks(rs)).encode(), delay=0.2)
    cache = make_cache()
    results: list[object] = []

    def lookup():
        results.append(cache.key(jwks_server.url, rs.kid, "RS384").key_id)

    threads = [threading.Thread(target=lookup) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [rs.kid] * 16
    assert jwks_server.count == 1


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 500, "body": b"{}"},
        {"status": 404, "body": b""},
        {"status": 200, "body": b"<html>not json</html>"},
        {"status": 200, "body": b'{"keys": "nope"}'},
        {"status": 200, "body": b'{"keys": [' + b'{"kty": "RSA"},' * 20000 + b"{}]}"},
        {"status": 302, "headers": {"Location": "/elsewhere"}},
        {"status": 200, "body": b'{"keys": []}', "delay": 1.0},
    ],
    ids=["500", "404", "not-json", "not-a-jwk-set", "too-large", "redirect", "timeout"],
)
def test_jwks_fetch_failures(rs, jwks_server, make_cache, answer):
    jwks_server.answer(JwksServer.DEFAULT_PATH, **answer)
    jwks_server.publish(rs, path="/elsewhere")
    settings = AuthSettings(allow_http_loopback_jku=True, jwks_timeout_s=0.3)
    cache = make_cache(settings)
    started = time.monotonic()
    with pytest.raises(AuthError) as info:
        cache.key(jwks_server.url, rs.kid, "RS384")
    assert info.value.reason == "jku-fetch"
    assert time.monotonic() - started < 0.9
    assert jwks_server.requests == [JwksServer.DEFAULT_PATH]  # redirects are not followed


@pytest.mark.parametrize(
    "member",
    [{"d": "AQAB"}, {"kty": "oct", "k": "c2VjcmV0"}, {"use": "enc"}, {"alg": "HS256"}],
    ids=["private", "symmetric", "encryption-key", "hmac-alg"],
)
def test_fetched_keys_that_cannot_verify_are_skipped(rs, jwks_server, make_cache,
                                                      member):
    jwks_server.publish(rs.public_jwk | member, rsa_key())
    cache = make_cache()
    with pytest.raises(AuthError) as info:
        cache.key(jwks_server.url, rs.kid, "RS384")
    assert info.value.reason == "kid"


def test_duplicate_kids_in_a_fetched_set_are_not_used(rs, jwks_server, make_cache):
    jwks_server.publish(rs, rsa_key(kid=rs.kid))
    with pytest.raises(AuthError) as info:
        make_cache().key(jwks_server.url, rs.kid, "RS384")
    assert info.value.reason == "kid"


# -- replay ---------------------------------------------------------------------------------


def test_replayed_token_is_refused(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    token = make_jwt(rs)
    assert verifier.verify(bearer(token), AUD)
    assert refused(verifier, token) == "replay"


def test_a_forged_token_cannot_burn_a_jti(rs, make_verifier):
    verifier = make_verifier(jwks_set=jwks(rs))
    jti = str(uuid.uuid4())
    forged = make_jwt(rsa_key().with_kid(rs.kid), jti=jti)
    assert refused(verifier, forged) == "signature"
    assert refused(verifier, make_jwt(rs, jti=jti, aud="https://other.example.org/")) == "aud"
    assert verifier.verify(bearer(make_jwt(rs, jti=jti)), AUD).jti == jti


def test_same_jti_from_another_issuer_is_not_a_replay(rs):
    replay = MemoryReplayCache()
    issuers = [TrustedIssuer("https://a.example.org", "a", jwks=jwks(rs)),
               TrustedIssuer("https://b.example.org", "b", jwks=jwks(rs))]
    verifier = TokenVerifier(issuers, replay)
    jti = str(uuid.uuid4())
    assert verifier.verify(bearer(make_jwt(rs, iss="https://a.example.org", jti=jti)), AUD)
    caller = verifier.verify(bearer(make_jwt(rs, iss="https://b.example.org", jti=jti)), AUD)
    assert caller.site_id == "b"


def test_replay_entry_lives_until_exp_plus_leeway(rs):
    calls = []

    class Recorder:
        def first_use(self, iss, jti, expires_at):
            calls.append((iss, jti, expires_at))
            return True

    verifier = TokenVerifier([TrustedIssuer(ISS, "a", jwks=jwks(rs))], Recorder(),
                             AuthSettings(leeway_s=45))
    exp = int(time.time()) + 900
    verifier.verify(bearer(make_jwt(rs, jti="j-1", exp=exp)), AUD)
    assert calls == [(ISS, "j-1", exp + 45)]


# -- logging --------------------------------------------------------------------------------


def _rejections(rs: TestKey, server: JwksServer) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    jku = {"jku": server.url}
    return {
        "alg-none": (make_jwt(None, headers={"kid": rs.kid, **jku}), "alg"),
        "hs256-public-key": (make_jwt(rs.public_pem, headers={"kid": rs.kid, **jku}), "alg"),
        "expired": (make_jwt(rs, headers=jku, iat=now - 900, exp=now - 300), "exp"),
        "iat-future": (make_jwt(rs, headers=jku, iat=now + 600, exp=now + 900), "iat"),
        "nbf-ahead": (make_jwt(rs, headers=jku, nbf=now + 600), "nbf"),
        "wrong-aud": (make_jwt(rs, headers=jku, aud="https://x.example.org/"), "aud"),
        "unknown-iss": (make_jwt(rs, headers=jku, iss="https://evil.example.org"), "iss"),
        "jku-not-listed": (make_jwt(rs, headers={"jku": server.url_for("/x")}), "jku"),
        "unknown-kid": (make_jwt(rsa_key(), headers=jku), "kid"),
        "bad-signature": (make_jwt(rsa_key().with_kid(rs.kid), headers=jku), "signature"),
        "typ": (make_jwt(rs, headers={"typ": "JOSE", **jku}), "typ"),
        "no-jti": (make_jwt(rs, headers=jku, jti=None), "jti"),
        "lifetime": (make_jwt(rs, headers=jku, exp=now + 7200), "lifetime"),
    }


@pytest.mark.parametrize("case", [
    "alg-none", "hs256-public-key", "expired", "iat-future", "nbf-ahead", "wrong-aud",
    "unknown-iss", "jku-not-listed", "unknown-kid", "bad-signature", "typ", "no-jti", "lifetime",
    "replay",
])
def test_token_never_logged(rs, jwks_server, make_verifier, caplog, case):
    jwks_server.publish(rs)
    verifier = make_verifier()
    if case == "replay":
        token, reason = make_jwt(rs, headers={"jku": jwks_server.url}), "replay"
        verifier.verify(bearer(token), AUD)
    else:
        token, reason = _rejections(rs, jwks_server)[case]
    caplog.set_level(logging.DEBUG)

    assert refused(verifier, token) == reason

    warnings = [r for r in caplog.records if r.name == "cds_service.trust.auth"
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"reason={reason}" in warnings[0].getMessage()
    head, payload, signature = token.split(".")
    for secret in (token, head, payload, signature):
        if secret:
            assert secret not in caplog.text
    assert signature_segment(token) == signature


def test_log_fields_are_single_line_and_bounded(rs, make_verifier, caplog):
    caplog.set_level(logging.WARNING)
    token = make_jwt(rs, iss="https://evil.example.org\nFAKE reason=ok", jti="j" * 400)
    assert refused(make_verifier(jwks_set=jwks(rs)), token) == "iss"
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and "j" * 200 not in message


# -- construction ---------------------------------------------------------------------------


def _rsa_private_jwk(key: TestKey) -> dict:
    from jwt.algorithms import RSAAlgorithm

    return json.loads(RSAAlgorithm.to_jwk(key.private)) | {"kid": key.kid}


@pytest.mark.parametrize(
    ("issuers", "message"),
    [
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k)), TrustedIssuer(ISS, "b", jwks=jwks(k))],
         "configured twice"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k), algorithms=("HS256",))], "HS256"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k), algorithms=("RS384", "none"))],
         "'none'"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k), algorithms=("EdDSA",))], "EdDSA"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k), algorithms=())], "no algorithms"),
        (lambda k: [TrustedIssuer(ISS, "a", jku=("http://ehr.example.org/jwks",))], "not https"),
        (lambda k: [TrustedIssuer(ISS, "a", jku=("http://127.0.0.1:8080/jwks",))], "not https"),
        (lambda k: [TrustedIssuer(ISS, "a", jku=("https://u:p@ehr.example.org/jwks",))],
         "credentials"),
        (lambda k: [TrustedIssuer(ISS, "a")], "jku URLs or an out-of-band"),
        (lambda k: [TrustedIssuer("", "a", jwks=jwks(k))], "empty"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0",
                                                            "kid": "s"}]})], "secret or private"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": [_rsa_private_jwk(k)]})],
         "secret or private"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": [k.public_jwk, k.public_jwk]})],
         "repeats kid"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": [{"kty": "RSA", "kid": "x",
                                                            "n": "!!", "e": "AQAB"}]})],
         "not a usable"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": [{"kty": "RSA", "n": "AQAB"}]})],
         "no kid"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"kid": "x"})], "not a JWK Set"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks={"keys": []})], "no signature verification"),
        (lambda k: [TrustedIssuer(ISS, "a", jwks=jwks(k), audiences=("",))], "audiences"),
    ],
    ids=["duplicate-iss", "hs256", "none", "eddsa", "no-algs", "http-jku", "http-loopback-jku",
         "jku-credentials", "no-keys", "empty-iss", "oct-key", "private-key", "duplicate-kid",
         "bad-key", "no-kid", "not-jwks", "empty-jwks", "empty-audience"],
)
def test_constructor_refuses_unsafe_configuration(rs, issuers, message):
    with pytest.raises(ValueError, match=message):
        TokenVerifier(issuers(rs), MemoryReplayCache())


def test_http_loopback_jku_only_when_allowed():
    issuer = TrustedIssuer(ISS, "a", jku=("http://127.0.0.1:8080/jwks", "http://[::1]/jwks",
                                          "http://localhost:1/jwks"))
    assert TokenVerifier([issuer], MemoryReplayCache(), LOOPBACK).issuers == (issuer,)
    with pytest.raises(ValueError, match="not https"):
        TokenVerifier([issuer], MemoryReplayCache(), AuthSettings())
    with pytest.raises(ValueError, match="not https"):
        TokenVerifier([TrustedIssuer(ISS, "a", jku=("http://10.0.0.1/jwks",))],
                      MemoryReplayCache(), LOOPBACK)
