"""Webhook delivery against a real HTTP receiver on loopback, and the callback URL checks."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpcore
import httpx
import pytest
import trustme

from service import webhooks
from service.webhooks import (
    INVALID_REDIRECT,
    Attempt,
    CallbackLookupFailed,
    InvalidCallbackUrl,
    WebhookConfig,
    WebhookSender,
    _ResolvingBackend,
    check_callback_url,
    sign,
)
from tests.webhook_receiver import STALL, Receiver, receiving

SECRET = "test-webhook-secret"
PAYLOAD: dict[str, object] = {
    "task_id": "7f3c",
    "status": "done",
    "result": {"label": "tabby cat", "score": 0.875},
    "note": "ünïcødé",
}
TIMEOUT_S = 0.3
# Tiny backoff and timeout keep the suite fast; loopback answers well within them.
FAST = {"timeout_s": TIMEOUT_S, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as running:
        yield running


@pytest.fixture
async def make_sender() -> AsyncIterator[Callable[..., WebhookSender]]:
    """Builds senders (private targets allowed, fast timings unless overridden), closed after."""
    senders: list[WebhookSender] = []

    def make(**overrides: object) -> WebhookSender:
        options: dict[str, object] = {"allow_private": True, **FAST, **overrides}
        sender = WebhookSender(WebhookConfig(**options))  # type: ignore[arg-type]
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.aclose()


@pytest.fixture
def lookups() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, so no one else takes it, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# Delivery: one attempt at a time


async def test_the_receiver_gets_the_exact_json_body_signed(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender(secret=SECRET).attempt(receiver.url, PAYLOAD)

    assert attempt == Attempt(attempts=1, error=None, retry_in_s=None)
    assert attempt.delivered
    [request] = receiver.received
    assert request.body == json.dumps(PAYLOAD, separators=(",", ":")).encode()
    assert json.loads(request.body) == PAYLOAD
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "resnet18-service-webhook/1"
    expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Signature-256"], expected)


async def test_without_a_secret_there_is_no_signature_header(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    assert attempt.delivered
    [request] = receiver.received
    assert "X-Signature-256" not in request.headers


def test_sign_matches_githubs_documented_example() -> None:
    # From GitHub's "Validating webhook deliveries" documentation.
    assert sign(b"Hello, World!", "It's a Secret to Everybody") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_5xx_and_other_transient_answers_are_tried_again(
    status: int, receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    receiver.then = status

    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    assert (attempt.attempts, attempt.error) == (1, f"callback answered {status}")
    assert attempt.retry_in_s is not None
    assert FAST["backoff_initial_s"] / 2 <= attempt.retry_in_s <= FAST["backoff_initial_s"]
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    ("status", "retry_after", "backoff_max_s", "expected_s"),
    [
        (429, "30", 60.0, 30.0),
        (503, "30", 60.0, 30.0),
        (429, "3600", 60.0, 60.0),  # no longer than the settings' longest wait
        (429, "soon", 60.0, None),  # unreadable: the backoff's
        (429, "30, 60", 60.0, 30.0),  # sent twice, joined: the first
        (500, "30", 60.0, None),  # only 429 and 503 say when to come back
    ],
)
async def test_a_receiver_that_says_when_to_come_back_is_not_tried_sooner(
    status: int,
    retry_after: str,
    backoff_max_s: float,
    expected_s: float | None,
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
) -> None:
    """Retried within seconds, a rate-limited receiver's webhook (429 with Retry-After: 30)
    would be lost after WEBHOOK_MAX_ATTEMPTS quick tries."""
    receiver.then = status
    receiver.headers = {"Retry-After": retry_after}

    attempt = await make_sender(backoff_max_s=backoff_max_s).attempt(receiver.url, PAYLOAD)

    assert attempt.retry_in_s is not None
    if expected_s is None:
        assert attempt.retry_in_s <= FAST["backoff_initial_s"]
    else:
        # Up to a tenth more, so that deliveries refused together do not return together.
        assert expected_s <= attempt.retry_in_s <= min(expected_s * 1.1, backoff_max_s)


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda when: email.utils.format_datetime(when, usegmt=True), id="imf"),
        # One of the three forms RFC 9110 has recipients read; it names no zone: GMT.
        pytest.param(lambda when: when.strftime("%a %b %d %H:%M:%S %Y"), id="asctime"),
    ],
)
async def test_a_retry_after_date_is_read_as_the_wait_until_it(
    form: Callable[[datetime], str],
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
) -> None:
    receiver.then = 503
    receiver.headers = {"Retry-After": form(datetime.now(UTC) + timedelta(seconds=40))}

    attempt = await make_sender(backoff_max_s=60.0).attempt(receiver.url, PAYLOAD)

    assert attempt.retry_in_s is not None
    assert 37 <= attempt.retry_in_s <= 44


async def test_a_receiver_slower_than_the_timeout_is_tried_again(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    receiver.script = [STALL]
    started = time.monotonic()

    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    assert (attempt.attempts, attempt.error) == (1, f"timed out after {TIMEOUT_S} s")
    assert attempt.retry_in_s is not None
    assert TIMEOUT_S * 0.8 <= time.monotonic() - started < TIMEOUT_S * 10


async def test_the_last_allowed_attempt_ends_the_delivery(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    receiver.then = 500

    attempt = await make_sender(max_attempts=4).attempt(receiver.url, PAYLOAD, attempts_done=3)

    assert attempt == Attempt(attempts=4, error="callback answered 500", retry_in_s=None)
    assert len(receiver.received) == 1


async def test_attempts_done_earlier_number_the_next(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender(max_attempts=5).attempt(receiver.url, PAYLOAD, attempts_done=3)

    assert attempt == Attempt(attempts=4, error=None, retry_in_s=None)
    assert len(receiver.received) == 1


async def test_no_attempt_is_made_once_the_limit_is_spent(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender(max_attempts=5).attempt(receiver.url, PAYLOAD, attempts_done=5)

    assert not attempt.delivered
    assert (attempt.attempts, attempt.retry_in_s) == (5, None)
    assert attempt.error is not None
    assert "no attempts left" in attempt.error
    assert receiver.received == []


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_other_statuses_end_the_delivery(
    status: int, receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    receiver.then = status

    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    assert attempt == Attempt(attempts=1, error=f"callback answered {status}", retry_in_s=None)
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    ("status", "location", "target"),
    [
        (307, "http://127.0.0.1:9/elsewhere", "http://127.0.0.1:9/elsewhere"),
        (308, "/hook/", "{origin}/hook/"),  # made whole from callback_url
        (301, "//example.org/x", "http://example.org/x"),
        # What may be the receiver's secrets stays out of the task's status and the logs.
        (
            302,
            "https://user:secret@example.org/h?token=abc#f",
            "https://example.org/h (its credentials, query and fragment left out)",
        ),
        (303, "/" + "x" * 300, "{origin}/" + "x" * 300),  # cut to 200 characters
        (307, "/p?token=abc", "{origin}/p (its query left out)"),
    ],
)
async def test_a_redirect_ends_the_delivery_and_says_where_it_pointed(
    status: int,
    location: str,
    target: str,
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
) -> None:
    receiver.then = status
    receiver.headers["Location"] = location

    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    target = target.replace("{origin}", f"http://127.0.0.1:{receiver.port}")
    shown = target if len(target) <= 200 else target[:200] + "..."
    assert attempt == Attempt(
        attempts=1,
        error=f"callback answered {status}, a redirect to {shown}, which is not followed: give "
        "the address it redirects to as callback_url",
        retry_in_s=None,
    )
    assert len(receiver.received) == 1  # not followed


@pytest.mark.parametrize(
    ("status", "location", "error"),
    [
        (
            302,
            "ftp://example.org/x",
            "callback answered 302, a redirect to a 'ftp' URL, which is not followed",
        ),
        (304, "/elsewhere", "callback answered 304"),  # not a redirect
        (302, "http://[::1/x", INVALID_REDIRECT),
    ],
)
async def test_a_redirect_that_cannot_be_given_instead_ends_the_delivery_saying_so(
    status: int,
    location: str,
    error: str,
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
) -> None:
    """Not tried again, and not blamed on callback_url: the answer was the receiver's."""
    receiver.then = status
    receiver.headers["Location"] = location

    attempt = await make_sender().attempt(receiver.url, PAYLOAD)

    assert attempt == Attempt(attempts=1, error=error, retry_in_s=None)
    assert len(receiver.received) == 1


async def test_a_refused_connection_is_tried_again_and_reported(
    closed_port: int, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender(max_attempts=3).attempt(
        f"http://127.0.0.1:{closed_port}/hook", PAYLOAD
    )

    assert (attempt.attempts, attempt.error) == (1, "connection refused")
    assert attempt.retry_in_s is not None


async def test_a_receiver_that_resets_the_connection_is_named_in_the_error(
    make_sender: Callable[..., WebhookSender],
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        attempt = await make_sender(max_attempts=3).attempt(f"http://127.0.0.1:{port}/", PAYLOAD)

    assert not attempt.delivered
    assert attempt.retry_in_s is not None
    assert attempt.error is not None
    assert "the receiver closed or reset the connection" in attempt.error


@pytest.mark.parametrize("header_line", [b"secret-data-12345", b"x" * 12_000])
async def test_what_a_malformed_answer_holds_stays_out_of_the_error(
    make_sender: Callable[..., WebhookSender], header_line: bytes
) -> None:
    """The error is shown in the task's status, which its submitter reads: a receiver on a
    private address (with WEBHOOK_ALLOW_PRIVATE) must not have its bytes read back so."""

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 200 OK\r\nX: a\r\n" + header_line + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        attempt = await make_sender(max_attempts=3).attempt(f"http://127.0.0.1:{port}/", PAYLOAD)

    assert not attempt.delivered
    assert attempt.error == "RemoteProtocolError: illegal header line"


async def test_an_https_receiver_of_a_private_ca_is_trusted_with_webhook_ca_file(
    tmp_path: Path, make_sender: Callable[..., WebhookSender]
) -> None:
    """Receivers on a local network often hold certificates of a private CA: their
    deliveries fail verification, as they must, unless that CA is given, and then succeed.
    The public CAs stay trusted beside it."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async with receiving(tls) as receiver:
        refused = await make_sender(max_attempts=3).attempt(receiver.url, PAYLOAD)
        trusted = await make_sender(ca_file=ca_file).attempt(receiver.url, PAYLOAD)

    assert not refused.delivered
    assert refused.error is not None
    assert "certificate verify failed" in refused.error
    assert trusted == Attempt(attempts=1, error=None, retry_in_s=None)
    assert len(receiver.received) == 1
    assert json.loads(receiver.received[0].body) == PAYLOAD


def test_an_attempt_cut_off_counts_but_never_ends_the_delivery() -> None:
    """Counted, since the receiver may have it, the last allowed one too, which is tried
    again rather than the delivery given up, since the receiver may not have it."""
    sender = WebhookSender(WebhookConfig(max_attempts=3, **FAST))  # type: ignore[arg-type]

    first = sender.cut_off(attempts_done=0)
    last = sender.cut_off(attempts_done=2)

    assert (first.attempts, first.delivered) == (1, False)
    assert first.error == "cut off by a shutdown before the callback answered"
    assert first.retry_in_s is not None
    assert FAST["backoff_initial_s"] / 2 <= first.retry_in_s <= FAST["backoff_initial_s"]
    assert (last.attempts, last.error) == (3, first.error)
    assert last.retry_in_s is not None


async def test_the_last_allowed_attempt_cut_off_is_made_again(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    """Once, beyond the limit, and counted: the count is what the receiver may have had."""
    receiver.then = 500
    sender = make_sender(max_attempts=3)

    again = await sender.attempt(receiver.url, PAYLOAD, attempts_done=3, last_cut_off=True)

    assert again == Attempt(attempts=4, error="callback answered 500", retry_in_s=None)
    assert len(receiver.received) == 1


async def test_cancelling_an_attempt_waiting_for_an_answer_propagates(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    receiver.script = [STALL]
    task = asyncio.create_task(make_sender(timeout_s=30).attempt(receiver.url, PAYLOAD))
    await receiver.arrived.wait()

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_waits_between_attempts_double_up_to_the_cap_across_restarts(
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait after the n-th attempt is drawn between half and all of the initial backoff
    times 2 ** (n - 1) (equal jitter; drawn at each end here), capped, and numbered from the
    delivery's first attempt, so a delivery resumed after a restart goes on doubling from
    where it was."""
    receiver.then = 500
    sender = make_sender(backoff_initial_s=0.1, backoff_max_s=0.5, max_attempts=10)

    async def waits() -> list[float | None]:
        return [
            (await sender.attempt(receiver.url, PAYLOAD, attempts_done=done)).retry_in_s
            for done in range(5)
        ]

    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert await waits() == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert await waits() == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25])


# Configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secret": ""}, "WEBHOOK_SECRET"),
        ({"max_attempts": 0}, "max_attempts is 0"),
        ({"timeout_s": 0}, "timeout_s is 0"),
        ({"backoff_initial_s": -1}, "backoff_initial_s is -1"),
        ({"backoff_initial_s": 5, "backoff_max_s": 1}, "backoff_max_s is 1"),
    ],
    ids=["empty-secret", "no-attempts", "no-timeout", "negative-backoff", "max-below-initial"],
)
def test_a_bad_config_is_refused_on_creation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookConfig(**overrides)  # type: ignore[arg-type]


# Callback URL checks

LOOPBACK_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://x", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("http:///nohost", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://example.com/" + "a" * 2048, "at most 2048"),
        ("http://127.0.0.1/", "is a loopback address"),
        ("http://localhost/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/", "loopback"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd00::1]/", "private"),
        ("http://[fec0::1]/", "site-local"),
        ("http://93.184.215.14\t/hook", "control characters"),
        ("http://example.com\n.evil/", "control characters"),
        ("http://example.com/a b", "whitespace"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[64:ff9b::a00:1]/", "private"),  # NAT64 of 10.0.0.1
        ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://192.0.0.8/", "is an IETF protocol assignment"),
        ("http://192.0.0.100/", "IETF protocol assignment"),
        ("http://0.0.0.0/", "is an unspecified address"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "is a reserved address"),
        ("http://255.255.255.255/", "is the broadcast address"),
        ("http://192.0.2.1/", "is a documentation"),
        ("http://[2001:db8::1]/", "is a documentation"),
        ("http://198.18.0.1/", "is a benchmarking"),
        ("http://no-such-host.invalid/", "does not resolve"),
        ("http://example.com:0/", "port is 0"),
    ],
)
def test_unsafe_callback_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(InvalidCallbackUrl, match=why):
        check_callback_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["http://10.1.2.3/", "http://localhost/", "http://[::1]/"])
def test_an_address_refusal_names_the_setting_that_allows_it(url: str) -> None:
    with pytest.raises(InvalidCallbackUrl, match="WEBHOOK_ALLOW_PRIVATE"):
        check_callback_url(url, allow_private=False)


@pytest.mark.parametrize("url", [*LOOPBACK_URLS, "http://10.1.2.3:8080/hook"])
def test_private_targets_are_accepted_when_allowed(url: str) -> None:
    check_callback_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        # Metadata services at addresses of ranges the setting opens: AWS IPv6 and EKS Pod
        # Identity, Google Cloud IPv6, Alibaba Cloud (carrier-grade NAT).
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254%251]/latest/meta-data/", "cloud metadata"),  # a zone id
        ("http://[fd00:ec2::23]/", "cloud metadata"),
        ("http://[fd20:ce::254]/", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
        ("http://[::ffff:100.100.100.200]/", "cloud metadata"),
        ("http://224.0.0.1/", "multicast"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://240.0.0.1/", "reserved"),
        ("http://198.18.0.1/", "benchmarking"),
        # Python's is_private, but no local network: "this network", IPv6 benchmarking,
        # Teredo.
        ("http://0.1.2.3/", "special-purpose"),
        ("http://[2001:2::1]/", "special-purpose"),
        ("http://[2001::1]/", "special-purpose"),
    ],
)
def test_allowing_private_targets_still_refuses_what_no_receiver_needs(url: str, kind: str) -> None:
    """Cloud metadata, multicast and unrouted addresses stay refused: with them any API
    client could probe the network through the delivery errors."""
    with pytest.raises(InvalidCallbackUrl, match=f"{kind}.*no receiver is reached") as refused:
        check_callback_url(url, allow_private=True)
    # Nor is the setting suggested where it would not help.
    with pytest.raises(InvalidCallbackUrl, match=f"{kind}.*no receiver is reached") as refused:
        check_callback_url(url, allow_private=False)
    assert "set WEBHOOK_ALLOW_PRIVATE=true" not in str(refused.value)


async def test_allowing_private_targets_refuses_link_local_at_connect_too(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("169.254.169.254"))
    backend = _ResolvingBackend(ScriptedBackend({}), lookups, allow_private=True)
    with pytest.raises(httpcore.ConnectError, match="link-local"):
        await backend.connect_tcp("metadata.example", 80, timeout=10)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "http:///nohost",
        "http://user:pw@localhost/",
        # Labels the HTTP client cannot encode: every delivery would fail before sending.
        "http://xn--/hook",
        "http://XN--/",
        "http://xn--a/",
        "http://xn--zz-.example.com/",
    ],
    ids=str,
)
def test_allowing_private_targets_still_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidCallbackUrl):
        check_callback_url(url, allow_private=True)


def test_allowing_private_targets_still_refuses_a_name_that_does_not_resolve() -> None:
    """Every delivery to it would fail: refused at submission, as without the setting."""
    with pytest.raises(InvalidCallbackUrl, match="does not resolve"):
        check_callback_url("http://no-such-host.invalid/hook", allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.215.14/",
        "https://93.184.215.14:8443/hook?task=1",
        "http://[2606:4700:4700::1111]/",
        "http://[::ffff:93.184.215.14]/",
        "http://192.0.0.9/",  # the two anycast services in 192.0.0.0/24
        "http://192.0.0.10/",
    ],
)
def test_public_ip_literals_are_accepted(url: str) -> None:
    check_callback_url(url, allow_private=False)


def test_a_name_is_refused_if_any_of_its_addresses_is_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def resolve(host: str, port: object, *args: object, **kwargs: object) -> list[object]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 80)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(
        InvalidCallbackUrl, match=r"'mixed\.example' resolves to a private"
    ) as refused:
        check_callback_url("http://mixed.example/", allow_private=False)
    assert "10.0.0.7" not in str(refused.value)  # what internal names resolve to stays inside


@pytest.mark.parametrize(
    "error",
    [
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure in name resolution"),
        OSError(24, "Too many open files"),
    ],
    ids=["no answer", "server failure", "no file descriptors"],
)
def test_a_lookup_dns_fails_to_answer_is_not_taken_for_a_bad_url(
    monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """A name that does not exist is the caller's mistake; DNS failing to answer, or this
    host short of resources, is not."""

    def no_answer(*args: object, **kwargs: object) -> list[object]:
        raise error

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)
    with pytest.raises(CallbackLookupFailed, match="retry shortly"):
        check_callback_url("https://hooks.example/", allow_private=False)


@pytest.mark.parametrize("code", [socket.EAI_NONAME, socket.EAI_NODATA])
def test_a_name_without_addresses_is_a_bad_url(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def no_such_name(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(code, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(InvalidCallbackUrl, match="does not resolve"):
        check_callback_url("https://hooks.example/", allow_private=False)


# Server-side request forgery at delivery and connect time


async def test_delivery_to_loopback_is_refused_without_any_request_and_not_retried(
    receiver: Receiver, make_sender: Callable[..., WebhookSender]
) -> None:
    attempt = await make_sender(allow_private=False).attempt(receiver.url, PAYLOAD)

    assert not attempt.delivered
    assert (attempt.attempts, attempt.retry_in_s) == (0, None)  # no POST was made
    assert attempt.error is not None
    assert "loopback" in attempt.error
    assert receiver.received == []


async def test_a_name_that_does_not_resolve_for_now_is_retried(
    make_sender: Callable[..., WebhookSender], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS failing at delivery time is a failed attempt, retried like a network error; it
    does not end the delivery."""

    def no_dns(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)

    attempt = await make_sender(allow_private=False, max_attempts=3).attempt(
        "https://hooks.example.com/done", PAYLOAD
    )

    assert not attempt.delivered
    assert attempt.attempts == 1
    assert attempt.retry_in_s is not None
    assert attempt.error is not None
    assert "resolve" in attempt.error


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_resolver_that_hangs_holds_none_of_the_default_executors_threads(
    make_sender: Callable[..., WebhookSender], monkeypatch: pytest.MonkeyPatch, allow_private: bool
) -> None:
    """The server's metrics, task submissions and shutdown use asyncio's default executor:
    deliveries whose lookups hang, more than it has threads, leave it free, and each
    attempt fails at its timeout, to be tried again."""
    hung = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host == "hangs.example":
            hung.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sender = make_sender(allow_private=allow_private, max_attempts=3)
    try:
        deliveries = [
            asyncio.create_task(sender.attempt("http://hangs.example/hook", PAYLOAD))
            for _ in range(40)  # more than the default executor's threads on any machine
        ]
        await asyncio.sleep(TIMEOUT_S / 3)
        async with asyncio.timeout(TIMEOUT_S):
            assert await asyncio.to_thread(lambda: "free") == "free"
        attempts = await asyncio.wait_for(asyncio.gather(*deliveries), 5 * TIMEOUT_S)
    finally:
        hung.set()
    for attempt in attempts:
        assert not attempt.delivered
        assert attempt.retry_in_s is not None
        assert attempt.error is not None
        assert "timed out" in attempt.error


async def test_a_host_whose_lookups_hang_holds_up_no_other_receivers_delivery(
    receiver: Receiver, make_sender: Callable[..., WebhookSender], monkeypatch: pytest.MonkeyPatch
) -> None:
    hung = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> object:
        if host == "hangs.example":
            hung.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "receiver.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sender = make_sender(allow_private=True, timeout_s=2.0)
    try:
        stuck = [
            asyncio.create_task(sender.attempt("http://hangs.example/hook", PAYLOAD))
            for _ in range(16)
        ]
        await asyncio.sleep(0.1)
        url = f"http://receiver.example:{receiver.port}/hook"
        attempt = await asyncio.wait_for(sender.attempt(url, PAYLOAD), 1.5)
        assert attempt.delivered
        assert len(receiver.received) == 1
    finally:
        hung.set()
    await asyncio.gather(*stuck)


async def test_many_slow_deliveries_at_once_each_get_a_connection(
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The address-checking transport has httpx's connection limits (100), not httpcore's
    (10): 30 deliveries to a slow receiver all go out at once, none times out waiting."""
    monkeypatch.setattr(webhooks, "_refusal_reason", lambda ip, **_: None)  # let loopback through
    receiver.script = [STALL] * 30
    sender = make_sender(allow_private=False, timeout_s=5.0)
    deliveries = [asyncio.create_task(sender.attempt(receiver.url, PAYLOAD)) for _ in range(30)]
    async with asyncio.timeout(5):
        while len(receiver.received) < 30:
            await asyncio.sleep(0.01)
    receiver.release.set()
    attempts = await asyncio.gather(*deliveries)
    assert all(attempt.delivered and attempt.attempts == 1 for attempt in attempts)


async def test_the_connection_is_vetted_even_when_the_submit_check_passed(
    receiver: Receiver,
    make_sender: Callable[..., WebhookSender],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in DNS rebinding: the name looked public when checked, then resolves to loopback.
    monkeypatch.setattr(webhooks, "check_callback_url", lambda url, *, allow_private: None)
    attempt = await make_sender(allow_private=False).attempt(
        f"http://localhost:{receiver.port}/hook", PAYLOAD, attempts_done=1
    )

    assert not attempt.delivered
    # Refusing again changes nothing; and no POST was made, so none is counted: `attempts`
    # says how many the receiver may have had.
    assert (attempt.attempts, attempt.retry_in_s) == (1, None)
    assert attempt.error is not None
    assert attempt.error.startswith("refused to connect to localhost: a loopback address;")
    assert "127.0.0.1" not in attempt.error
    assert receiver.received == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::ffff:127.0.0.1"])
async def test_the_network_backend_refuses_loopback_itself(
    host: str, receiver: Receiver, lookups: ThreadPoolExecutor
) -> None:
    backend = _ResolvingBackend(httpcore.AnyIOBackend(), lookups, allow_private=False)

    with pytest.raises(httpcore.ConnectError, match=r"refused to connect.*loopback"):
        await backend.connect_tcp(host, receiver.port, timeout=TIMEOUT_S)


class ClosableStream(httpcore.AsyncNetworkStream):
    def __init__(self, host: str) -> None:
        self.host = host
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class ScriptedBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the real backend: records where it is asked to connect, and connects
    to each address as told: "ok" (unless told otherwise), "hang" (never answers), "fail",
    or "gate" (once ``gate`` is set)."""

    def __init__(self, script: dict[str, str] | None = None) -> None:
        self.script = script or {}
        self.connects: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.cancelled: list[str] = []
        self.streams: list[ClosableStream] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        what = self.script.get(host, "ok")
        if what == "hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.append(host)
                raise
        if what == "fail":
            raise httpcore.ConnectError(f"{host} unreachable")
        if what == "gate":
            await self.gate.wait()
        stream = ClosableStream(host)
        self.streams.append(stream)
        return stream


def answer_with(*addresses: str) -> Callable[..., object]:
    def getaddrinfo(host: str, port: int, **kwargs: object) -> list[object]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return getaddrinfo


@pytest.mark.parametrize(
    ("url", "looked_up"),
    [
        ("http://faß.de/hook", "xn--fa-hia.de"),
        ("https://Straße.example:8443/hook", "xn--strae-oqa.example"),
        ("http://Hooks.Example.COM/", "hooks.example.com"),
    ],
)
def test_the_submission_looks_up_the_name_the_delivery_connects_to(
    monkeypatch: pytest.MonkeyPatch, url: str, looked_up: str
) -> None:
    """An internationalised name in the IDNA 2008 form the HTTP client uses: Python's own
    codec (IDNA 2003) would check "fass.de", another domain, than the one "faß.de" is
    delivered to."""
    names: list[str] = []
    answer = answer_with("93.184.215.14")

    def getaddrinfo(host: str, port: int, **kwargs: object) -> object:
        names.append(host)
        return answer(host, port, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    check_callback_url(url, allow_private=False)

    assert names == [looked_up]
    assert httpx.URL(url).raw_host.decode() == looked_up


async def test_the_backend_connects_to_the_address_it_vetted(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("93.184.215.14"))
    inner = ScriptedBackend()

    await _ResolvingBackend(inner, lookups, allow_private=False).connect_tcp("hooks.example", 443)

    assert inner.connects == [("93.184.215.14", 443)]


async def test_the_backend_refuses_a_name_with_any_private_address(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("93.184.215.14", "10.0.0.7"))
    inner = ScriptedBackend()
    backend = _ResolvingBackend(inner, lookups, allow_private=False)

    with pytest.raises(httpcore.ConnectError, match=r"hooks\.example: a private") as refused:
        await backend.connect_tcp("hooks.example", 443)
    assert "10.0.0.7" not in str(refused.value)
    assert inner.connects == []


async def test_an_address_that_does_not_answer_costs_a_moment_not_the_timeout(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    """Happy Eyeballs: a name whose first address is unreachable (a broken IPv6 route)
    connects to the next after 250 ms, and the first try is cancelled."""
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("93.184.215.14", "93.184.215.15"))
    inner = ScriptedBackend({"93.184.215.14": "hang", "93.184.215.15": "ok"})
    backend = _ResolvingBackend(inner, lookups, allow_private=False)
    started = time.monotonic()

    stream = await backend.connect_tcp("hooks.example", 443, timeout=10)

    assert isinstance(stream, ClosableStream)
    assert stream.host == "93.184.215.15"
    assert webhooks.HAPPY_EYEBALLS_DELAY_S <= time.monotonic() - started < 2
    assert inner.cancelled == ["93.184.215.14"]


async def test_a_failed_address_moves_on_at_once_and_the_last_failure_is_raised(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("93.184.215.14", "93.184.215.15"))
    inner = ScriptedBackend({"93.184.215.14": "fail", "93.184.215.15": "fail"})
    backend = _ResolvingBackend(inner, lookups, allow_private=True)
    started = time.monotonic()

    with pytest.raises(httpcore.ConnectError, match=r"93\.184\.215\.15 unreachable"):
        await backend.connect_tcp("hooks.example", 443, timeout=10)
    assert time.monotonic() - started < webhooks.HAPPY_EYEBALLS_DELAY_S


async def test_connections_made_in_the_same_instant_leave_one_open(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    monkeypatch.setattr(webhooks, "HAPPY_EYEBALLS_DELAY_S", 0.01)
    monkeypatch.setattr(socket, "getaddrinfo", answer_with("93.184.215.14", "93.184.215.15"))
    inner = ScriptedBackend({"93.184.215.14": "gate", "93.184.215.15": "gate"})
    backend = _ResolvingBackend(inner, lookups, allow_private=False)
    asyncio.get_running_loop().call_later(0.2, inner.gate.set)  # both tries begun by then

    stream = await backend.connect_tcp("hooks.example", 443)

    assert len(inner.streams) == 2  # both connected before either was looked at
    assert [each.closed for each in inner.streams] == [each is not stream for each in inner.streams]


async def test_a_connection_made_as_the_caller_is_cancelled_twice_is_closed() -> None:
    """A try that connects in the instant it is cancelled (the attempt's timeout), while a
    second cancel (the shutdown's) lands before the clean-up has closed it."""
    made: list[ClosableStream] = []

    async def connects_as_cancelled() -> httpcore.AsyncNetworkStream:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            asyncio.get_running_loop().call_soon(connecting.cancel)
            made.append(ClosableStream("late"))
            return made[-1]
        raise AssertionError("never reached")

    connecting = asyncio.ensure_future(_ResolvingBackend._connect_first([connects_as_cancelled]))
    await asyncio.sleep(0.05)
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    await asyncio.sleep(0.05)  # the shielded clean-up finishes on its own
    assert [stream.closed for stream in made] == [True]


async def test_the_address_families_take_turns(
    monkeypatch: pytest.MonkeyPatch, lookups: ThreadPoolExecutor
) -> None:
    """RFC 8305: two unreachable IPv6 addresses first must not each delay the IPv4 one."""
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, **kwargs: [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:2800::1", port, 0, 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:2800::2", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
        ],
    )
    inner = ScriptedBackend({"2606:2800::1": "hang", "2606:2800::2": "hang"})
    backend = _ResolvingBackend(inner, lookups, allow_private=False)

    stream = await backend.connect_tcp("hooks.example", 443, timeout=10)

    assert isinstance(stream, ClosableStream)
    assert stream.host == "93.184.215.14"
    assert [host for host, _ in inner.connects] == ["2606:2800::1", "93.184.215.14"]
