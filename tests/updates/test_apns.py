"""APNs client against a real HTTP/2 + TLS stand-in (tests/apns_standin.py); no mocks.

The client authenticates with a development Pass Type ID certificate (root → WWDR
stand-in → leaf, from app.wallet.certs.make_dev_certs); the stand-in trusts that chain,
checks the topic against the certificate's UID and answers from a per-token script.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.updates.apns import (
    APNS_PRODUCTION_URL,
    ApnsClient,
    ApnsError,
    ApnsPool,
    CircuitBreaker,
    PushResult,
)
from app.wallet.certs import SigningIdentity, load_identity, make_dev_certs
from tests.apns_standin import ApnsStandin

TOPIC = "pass.test.apns"
TEAM = "TEAMAPNS01"


@dataclass(frozen=True)
class DevChain:
    certs_path: Path
    root_ca: Path
    wwdr: Path
    identity: SigningIdentity


def _token(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> DevChain:
    certs_path = tmp_path_factory.mktemp("apns-certs")
    paths = make_dev_certs(certs_path, TOPIC, TEAM)
    return DevChain(certs_path, paths.root_ca, paths.wwdr,
                    load_identity(certs_path, paths.certificate_file, paths.key_file))


@pytest.fixture(scope="module")
def foreign_identity(tmp_path_factory: pytest.TempPathFactory) -> SigningIdentity:
    """Same pass type, but a chain from another root the stand-in does not trust."""
    certs_path = tmp_path_factory.mktemp("apns-foreign-certs")
    paths = make_dev_certs(certs_path, TOPIC, TEAM)
    return load_identity(certs_path, paths.certificate_file, paths.key_file)


@pytest.fixture()
def server(chain: DevChain) -> Iterator[ApnsStandin]:
    with ApnsStandin([chain.root_ca, chain.wwdr]) as standin:
        yield standin
    assert standin.errors == []


@pytest.fixture()
def client(server: ApnsStandin, chain: DevChain) -> Iterator[ApnsClient]:
    with ApnsClient(server.url, chain.identity.certificate, chain.identity.private_key,
                    ca_file=server.ca_file, timeout=5.0, max_concurrency=1000,
                    max_connections=1) as apns:
        yield apns


def test_each_answer_maps_to_its_outcome(server: ApnsStandin, client: ApnsClient) -> None:
    answers = [(200, None, "sent"),
               (400, "BadDeviceToken", "bad_token"),
               (400, "DeviceTokenNotForTopic", "bad_token"),
               (400, "BadTopic", "credentials"),
               (400, "MissingTopic", "credentials"),
               (400, "TopicDisallowed", "credentials"),
               (403, "BadCertificate", "credentials"),
               (403, "BadCertificateEnvironment", "credentials"),
               (410, "Unregistered", "unregistered"),
               (413, "PayloadTooLarge", "failed"),
               (429, "TooManyRequests", "retry"),
               (500, "InternalServerError", "retry"),
               (503, "ServiceUnavailable", "retry"),
               (400, "BadExpirationDate", "failed")]
    tokens = [_token(i) for i in range(len(answers))]
    for token, (status, reason, _) in zip(tokens, answers):
        if status != 200:
            server.script[token] = [(status, reason)]

    results = client.push(TOPIC, tokens)

    assert [r.push_token for r in results] == tokens  # token order kept
    assert [(r.status, r.reason, r.outcome) for r in results] == answers
    assert all(r.apns_id for r in results)  # APNs sends apns-id on errors too
    assert {(r.token, r.topic, r.body, r.client_uid) for r in server.received} == \
        {(t, TOPIC, b"{}", TOPIC) for t in tokens}


def test_script_is_consumed_then_200(server: ApnsStandin, client: ApnsClient) -> None:
    token = _token(7)
    server.script[token] = [(429, "TooManyRequests"), (503, None)]
    outcomes = [client.push(TOPIC, [token])[0] for _ in range(3)]
    assert [(r.status, r.outcome) for r in outcomes] == [(429, "retry"), (503, "retry"),
                                                         (200, "sent")]
    assert outcomes[1].reason is None  # no JSON body: no reason
    assert server.connection_ids() == {1}


def test_wrong_topic_is_refused(server: ApnsStandin, client: ApnsClient) -> None:
    [result] = client.push("pass.some.other.type", [_token(1)])
    assert (result.status, result.reason, result.outcome) == \
        (400, "DeviceTokenNotForTopic", "bad_token")
    assert server.received[0].topic == "pass.some.other.type"
    assert server.received[0].client_uid == TOPIC


def test_token_that_is_not_hex_is_not_sent(server: ApnsStandin, client: ApnsClient) -> None:
    results = client.push(TOPIC, ["../../admin", "", _token(1)])
    assert [(r.status, r.reason, r.outcome) for r in results[:2]] == \
        [(400, "BadDeviceToken", "bad_token")] * 2
    assert results[2].outcome == "sent"
    assert [r.token for r in server.received] == [_token(1)]


def test_untrusted_certificate_fails_the_handshake_not_the_caller(
        server: ApnsStandin, foreign_identity: SigningIdentity) -> None:
    tokens = ["not-hex", *(_token(i) for i in range(20))]
    with ApnsClient(server.url, foreign_identity.certificate, foreign_identity.private_key,
                    ca_file=server.ca_file, timeout=5.0) as apns:
        results = apns.push(TOPIC, tokens)

    assert [r.push_token for r in results] == tokens
    assert results[0].outcome == "bad_token"  # checked before sending
    assert {(r.status, r.apns_id, r.outcome) for r in results[1:]} == {(None, None, "retry")}
    reason = results[1].reason or ""
    assert "TLS" in reason and "certificate" in reason, reason
    assert server.received == []
    # One handshake for the whole call, not one per token (APNs would see a DoS).
    assert server.handshakes_refused == 1


def test_refused_certificate_trips_the_breaker_until_it_is_accepted(
        server: ApnsStandin, chain: DevChain) -> None:
    now = [0.0]
    breaker = CircuitBreaker(first=5.0, ceiling=600.0, clock=lambda: now[0])
    tokens = [_token(i) for i in range(50)]
    server.refuse_client_certificates = True  # as APNs refuses a revoked certificate

    def push() -> set[str]:
        return {r.outcome for r in apns.push(TOPIC, tokens)}

    with ApnsClient(server.url, chain.identity.certificate, chain.identity.private_key,
                    ca_file=server.ca_file, timeout=5.0, breaker=breaker) as apns:
        assert push() == {"retry"}
        problem = apns.problem()
        assert problem is not None and problem.failures == 1
        assert "TLS" in problem.reason and "certificate" in problem.reason
        for _ in range(5):  # jobs keep coming: not one handshake more while it waits
            assert push() == {"retry"}
        assert server.handshakes_started == 1
        now[0] += 4.9
        push()
        assert server.handshakes_started == 1
        now[0] += 0.1  # 5 s: one attempt, refused again; now 10 s to wait
        push()
        assert server.handshakes_started == 2
        now[0] += 9.9
        push()
        assert server.handshakes_started == 2
        now[0] += 0.1
        push()
        assert server.handshakes_started == 3 and apns.problem().failures == 3  # type: ignore[union-attr]
        paused = apns.push(TOPIC, tokens[:1])[0]
        assert "paused" in (paused.reason or "") and "next attempt in 20 s" in paused.reason

        server.refuse_client_certificates = False  # renewed upstream
        now[0] += 20
        assert push() == {"sent"}  # resumes by itself
        assert apns.problem() is None and server.handshakes_started == 4
        assert push() == {"sent"} and server.connections_opened == 1
    assert server.received and {r.connection_id for r in server.received} == {1}
    assert server.handshakes_refused == 3


def test_breaker_delay_doubles_up_to_its_ceiling() -> None:
    now = [0.0]
    breaker = CircuitBreaker(first=5.0, ceiling=60.0, clock=lambda: now[0])
    delays = []
    for _ in range(6):
        breaker.failed("refused")
        delays.append(breaker.retry_in())
        assert not breaker.allows()
        now[0] += delays[-1]
        assert breaker.allows()
    assert delays == [5, 10, 20, 40, 60, 60]
    breaker.succeeded()
    assert breaker.allows() and breaker.problem() is None


def test_unreachable_server_is_a_retry(chain: DevChain, tmp_path: Path) -> None:
    with ApnsStandin([chain.root_ca, chain.wwdr]) as standin:
        url, ca = standin.url, tmp_path / "ca.pem"
        ca.write_bytes(standin.ca_file.read_bytes())
    with ApnsClient(url, chain.identity.certificate, chain.identity.private_key,
                    ca_file=ca, timeout=2.0) as apns:
        results = apns.push(TOPIC, [_token(1), _token(2)])
    assert {(r.status, r.outcome) for r in results} == {(None, "retry")}
    assert "ConnectError" in (results[0].reason or "")


def test_slow_answer_times_out_as_retry(server: ApnsStandin, chain: DevChain) -> None:
    server.script[_token(1)] = [(200, None, 1.5)]
    with ApnsClient(server.url, chain.identity.certificate, chain.identity.private_key,
                    ca_file=server.ca_file, timeout=0.3) as apns:
        started = time.monotonic()
        [result] = apns.push(TOPIC, [_token(1)])
    assert time.monotonic() - started < 1.5
    assert (result.status, result.outcome) == (None, "retry")
    assert "Timeout" in (result.reason or "")


def test_500_pushes_multiplex_over_one_connection(server: ApnsStandin,
                                                  client: ApnsClient) -> None:
    tokens = [_token(i) for i in range(500)]
    for token in tokens:  # answers held back a little, so streams must overlap
        server.script[token] = [(200, None, 0.1)]

    results = client.push(TOPIC, tokens)

    assert [r.push_token for r in results] == tokens
    assert {r.outcome for r in results} == {"sent"}
    assert len({r.apns_id for r in results}) == 500
    assert sorted(r.token for r in server.received) == sorted(tokens)
    assert server.connection_ids() == {1}
    assert server.connections_opened == 1
    assert server.max_in_flight >= 10  # truly concurrent streams, not one after another


def test_a_full_connection_gets_company_up_to_the_limit(server: ApnsStandin,
                                                        chain: DevChain) -> None:
    tokens = [_token(i) for i in range(400)]
    for token in tokens:  # held back, so every stream stays open until all are sent
        server.script[token] = [(200, None, 2.0)]  # long enough on a loaded CI machine
    with ApnsClient(server.url, chain.identity.certificate, chain.identity.private_key,
                    ca_file=server.ca_file, timeout=5.0, max_concurrency=100,
                    max_connections=3) as apns:
        results = apns.push(TOPIC, tokens)
        assert {r.outcome for r in results} == {"sent"}
        assert server.connections_opened == 3  # 100 streams each, no fourth
        apns.push(TOPIC, [_token(1000)])
        assert server.connections_opened == 3  # kept open between calls
    by_connection = Counter(r.connection_id for r in server.received)
    assert sorted(by_connection) == [1, 2, 3] and sum(by_connection.values()) == 401
    assert server.max_in_flight == 100  # per connection: the cap, never more


def test_consecutive_calls_reuse_the_connection(server: ApnsStandin,
                                                client: ApnsClient) -> None:
    client.push(TOPIC, [_token(1), _token(2)])
    client.push(TOPIC, [_token(3)])
    with ThreadPoolExecutor(4) as threads:  # callers on several threads share it too
        list(threads.map(lambda n: client.push(TOPIC, [_token(n)]), range(10, 18)))
    assert server.connection_ids() == {1}
    assert server.connections_opened == 1
    assert server.open_connections() == 1  # still open between calls


def test_connection_closed_by_apns_is_reopened(server: ApnsStandin,
                                               client: ApnsClient) -> None:
    assert client.push(TOPIC, [_token(1)])[0].outcome == "sent"
    server.close_connections()  # GOAWAY, as APNs does to idle connections
    time.sleep(0.05)
    results = client.push(TOPIC, [_token(2), _token(3)])
    assert {r.outcome for r in results} == {"sent"}
    assert server.connection_ids() == {1, 2}


def test_pool_reuses_a_client_until_the_certificate_changes(
        server: ApnsStandin, chain: DevChain, tmp_path: Path) -> None:
    pool = ApnsPool(server.url, ca_file=server.ca_file, timeout=5.0)
    try:
        first = pool.client(TOPIC, chain.identity)
        assert pool.client(TOPIC, chain.identity) is first
        # The same certificate loaded again (a new SigningIdentity object) is the same.
        reloaded = load_identity(chain.certs_path, f"{TOPIC}/certificate.pem",
                                 f"{TOPIC}/key.pem")
        assert reloaded is not chain.identity
        assert pool.client(TOPIC, reloaded) is first
        assert first.push(TOPIC, [_token(1)])[0].outcome == "sent"

        # A renewed certificate (new key, same chain) gets a new client and connection.
        certs_path = tmp_path / "renewed"
        certs_path.mkdir()
        for sub in ("dev", "wwdr"):
            (certs_path / sub).symlink_to(chain.certs_path / sub, target_is_directory=True)
        paths = make_dev_certs(certs_path, TOPIC, TEAM)
        renewed = load_identity(certs_path, paths.certificate_file, paths.key_file)
        assert renewed.certificate != chain.identity.certificate
        second = pool.client(TOPIC, renewed)
        assert second is not first
        assert pool.client(TOPIC, renewed) is second
        assert second.push(TOPIC, [_token(2)])[0].outcome == "sent"
        assert server.connection_ids() == {1, 2}

        # The replaced client was closed; a caller still holding it gets "retry".
        [late] = first.push(TOPIC, [_token(3)])
        assert (late.status, late.outcome) == (None, "retry")
    finally:
        pool.close()
    assert not any(t.name.startswith("apns:") for t in threading.enumerate())


def test_close_is_clean(server: ApnsStandin, chain: DevChain) -> None:
    before = set(threading.enumerate())
    apns = ApnsClient(server.url, chain.identity.certificate, chain.identity.private_key,
                      ca_file=server.ca_file)
    assert apns.push(TOPIC, [_token(1)])[0].outcome == "sent"
    apns.close()
    apns.close()  # idempotent
    assert set(threading.enumerate()) <= before
    time.sleep(0.05)
    assert server.open_connections() == 0  # the connection was closed, not dropped


@pytest.mark.parametrize("url", ["http://api.push.apple.com", "https://api.push.apple.com/3/",
                                 "api.push.apple.com", "https://host:notaport"])
def test_bad_url_is_a_setup_error(url: str, chain: DevChain) -> None:
    with pytest.raises(ApnsError, match="APNs URL"):
        ApnsClient(url, chain.identity.certificate, chain.identity.private_key)
    with pytest.raises(ApnsError, match="APNs URL"):
        ApnsPool(url)


def test_unreadable_ca_file_or_mismatched_key_is_a_setup_error(
        chain: DevChain, foreign_identity: SigningIdentity, tmp_path: Path) -> None:
    with pytest.raises(ApnsError, match="cannot load as a CA file") as missing:
        ApnsClient(APNS_PRODUCTION_URL, chain.identity.certificate,
                   chain.identity.private_key, ca_file=tmp_path / "missing.pem")
    assert "\n" not in str(missing.value)
    with pytest.raises(ApnsError, match="do they belong together"):
        ApnsClient(APNS_PRODUCTION_URL, chain.identity.certificate,
                   foreign_identity.private_key)


def test_push_result_outcome_without_a_server() -> None:
    assert PushResult("ab", None, "ConnectError: refused", None).outcome == "retry"
    assert PushResult("ab", 502, None, None).outcome == "retry"
    assert PushResult("ab", 404, "BadPath", None).outcome == "failed"
    assert PushResult("ab", 405, "MethodNotAllowed", None).outcome == "failed"
    assert "abcdef01" in repr(PushResult("abcdef0123456789", 200, None, None))
    assert "0123456789" not in repr(PushResult("abcdef0123456789", 200, None, None))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+ warns
def test_pool_in_a_forked_process_opens_its_own_connection(server: ApnsStandin,
                                                           chain: DevChain) -> None:
    pool = ApnsPool(server.url, ca_file=server.ca_file, timeout=5.0)
    try:
        parent_client = pool.client(TOPIC, chain.identity)
        assert parent_client.push(TOPIC, [_token(1)])[0].outcome == "sent"
        pid = os.fork()
        if pid == 0:  # child: only the pool is used, then exit without pytest's teardown
            code = 1
            try:
                child_client = pool.client(TOPIC, chain.identity)
                with pytest.raises(ApnsError, match="forked"):
                    parent_client.push(TOPIC, [_token(2)])
                ok = child_client is not parent_client and \
                    child_client.push(TOPIC, [_token(3)])[0].outcome == "sent"
                code = 0 if ok else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 15
        while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("forked child hung")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(waited[1]) == 0
        assert parent_client.push(TOPIC, [_token(4)])[0].outcome == "sent"
        assert server.connection_ids() == {1, 2}
    finally:
        pool.close()


# -- token (.p8) authentication ----------------------------------------------------------

def _p8(tmp_path: Path) -> tuple[Path, object]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "AuthKey_ABC123DEFG.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key.public_key()


def test_token_authentication_without_client_certificate(chain: DevChain, tmp_path: Path) -> None:
    from app.updates.apns import ApnsTokenKey

    p8, public_key = _p8(tmp_path)
    with ApnsStandin([chain.root_ca, chain.wwdr], client_cert="optional") as standin:
        standin.token_keys["ABC123DEFG"] = (TEAM, public_key, {TOPIC})
        key = ApnsTokenKey.from_file(p8, "ABC123DEFG", TEAM)
        with ApnsClient(standin.url, token_key=key, ca_file=standin.ca_file) as apns:
            results = apns.push(TOPIC, [_token(1), _token(2)])
            assert [r.outcome for r in results] == ["sent", "sent"]
            other_team = apns.push("pass.other.team", [_token(3)])[0]
            assert (other_team.status, other_team.reason) == (400, "TopicDisallowed")
            assert other_team.outcome == "credentials"
        assert all(r.client_uid is None for r in standin.received)  # no certificate sent
        # A key the stand-in does not know is refused like APNs does.
        (tmp_path / "other").mkdir()
        wrong = ApnsTokenKey.from_file(_p8(tmp_path / "other")[0], "ABC123DEFG", TEAM)
        with ApnsClient(standin.url, token_key=wrong, ca_file=standin.ca_file) as apns:
            refused = apns.push(TOPIC, [_token(4)])[0]
        assert (refused.status, refused.reason, refused.outcome) == (
            403, "InvalidProviderToken", "credentials")
        assert standin.errors == []


def test_token_is_reused_then_refreshed(tmp_path: Path) -> None:
    import jwt

    from app.updates.apns import ApnsTokenKey

    p8, public_key = _p8(tmp_path)
    now = [1_800_000_000.0]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = ApnsTokenKey("ABC123DEFG", TEAM, load_pem_private_key(p8.read_bytes(), None),
                       clock=lambda: now[0])
    first = key.bearer()
    now[0] += 20 * 60
    assert key.bearer() == first  # Apple refuses tokens refreshed more often than 20 min
    now[0] += 31 * 60
    second = key.bearer()
    assert second != first
    claims = jwt.decode(second, public_key, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": TEAM, "iat": int(now[0])}
    assert jwt.get_unverified_header(second)["kid"] == "ABC123DEFG"
    with pytest.raises(ApnsError, match="elliptic-curve"):
        ApnsTokenKey("K", TEAM, object())  # type: ignore[arg-type]
