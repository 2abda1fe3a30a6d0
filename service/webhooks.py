"""Webhook delivery: POST a task's result to its callback URL, signed, one attempt at a time.

Knows nothing of the database or of metrics: each attempt says when the next is due, and
the caller stores that and comes back then. Unless private targets are allowed, a callback
may only reach globally routable addresses, checked when the URL is submitted and again
when each connection is opened (so a DNS answer that changes in between, as in DNS
rebinding, cannot turn the server against its own network).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import ipaddress
import itertools
import json
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeAlias
from urllib.parse import urlsplit

import httpcore
import httpx

from service import logs

MAX_URL_CHARS = 2048
# One per delivery a worker runs at once (``RunnerConfig.webhook_capacity``), started as
# needed: a host whose lookups hang holds up other receivers' deliveries only while more
# of its lookups are still blocked (an attempt gives up on one at WEBHOOK_TIMEOUT_S; its
# thread waits until the resolver does) than there are threads.
LOOKUP_THREADS = 64
# RFC 8305's recommended wait before the next address is tried.
HAPPY_EYEBALLS_DELAY_S = 0.25
USER_AGENT = "resnet18-service-webhook/1"
SIGNATURE_HEADER = "X-Signature-256"
# The error stored for an attempt that a stopping worker cut off before its answer.
CUT_OFF_ERROR = "cut off by a shutdown before the callback answered"
# A failed attempt's text, shown in the task's status and logged: an exception's message
# can quote what the receiver sent, at any length.
DESCRIBED_ERROR_MAX_CHARS = 200
# httpx builds the request a redirect would send even when not following it, and raises
# RemoteProtocolError, starting so, for a Location it cannot make a URL of.
INVALID_LOCATION = "Invalid URL in location header"
INVALID_REDIRECT = (
    "callback answered a redirect to an address that is not a valid URL (its Location header)"
)

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
# RFC 6052 NAT64 prefix: `ipaddress` calls it global, yet a NAT64 gateway forwards it to the
# IPv4 address in its last 32 bits, which may be private.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
# Ranges Python counts as private that are not: named for what they are when refused.
_DOCUMENTATION = tuple(
    ipaddress.ip_network(net)
    for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_BENCHMARKING = ipaddress.IPv4Network("198.18.0.0/15")
# Cloud metadata services outside link-local, inside ranges WEBHOOK_ALLOW_PRIVATE opens:
# AWS's IPv6 instance metadata and EKS Pod Identity, Google Cloud's IPv6 metadata server,
# Alibaba Cloud's metadata (in carrier-grade NAT space).
_CLOUD_METADATA = frozenset(
    ipaddress.ip_address(address)
    for address in ("fd00:ec2::254", "fd00:ec2::23", "fd20:ce::254", "100.100.100.200")
)
# The networks of RFC 1918 and RFC 4193 (unique local): what a local network uses. Python's
# is_private holds special-purpose ranges besides (0.0.0.0/8, Teredo, ORCHID, IPv6
# benchmarking), which no receiver is reached at.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
# IETF protocol assignments, not globally reachable (IANA), but for two anycast services;
# Python's is_global counts the rest of the range as global.
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
_GLOBAL_IETF_PROTOCOL = {ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10")}
# getaddrinfo's answers that the name has no address: the URL's fault, not DNS's.
_NO_SUCH_NAME = frozenset({socket.EAI_NONAME, socket.EAI_NODATA, socket.EAI_ADDRFAMILY})
_ALLOW_PRIVATE_HINT = (
    "only globally routable addresses are accepted; set WEBHOOK_ALLOW_PRIVATE=true to "
    "allow private targets (trusted networks only)"
)


_LOOPBACK = "a loopback"
_PRIVATE = "a private"
_CARRIER_GRADE_NAT = "a carrier-grade NAT"
# What WEBHOOK_ALLOW_PRIVATE opens: receivers on this host or the local networks. Not
# link-local (cloud metadata), multicast, reserved or unrouted addresses, which no
# receiver needs and a client could probe the network through.
_PRIVATE_KINDS = frozenset({_LOOPBACK, _PRIVATE, _CARRIER_GRADE_NAT})


class InvalidCallbackUrl(ValueError):
    """The callback URL is refused; the message says why."""


class CallbackLookupFailed(Exception):
    """The callback URL's host could not be looked up for now: DNS failed to answer, which
    says nothing of the URL (a name that does not exist is an ``InvalidCallbackUrl``)."""


def _refusal_reason(ip: _IPAddress, *, allow_private: bool = False) -> str | None:
    """Why `ip` may not be a callback target, or None when it is globally routable (or,
    with `allow_private`, loopback or of a private network)."""
    reason = _address_kind(ip)
    return None if allow_private and reason in _PRIVATE_KINDS else reason


def _refusal_hint(reason: str, allow_private: bool) -> str:
    """What to do about an address refused for ``reason``: the setting, where it helps."""
    if reason in _PRIVATE_KINDS and not allow_private:
        return _ALLOW_PRIVATE_HINT
    return (
        "no receiver is reached at such an address; WEBHOOK_ALLOW_PRIVATE opens loopback "
        "and private networks only"
    )


def _address_kind(ip: _IPAddress) -> str | None:
    """What kind of address `ip` is, or None when it is globally routable."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # A zone id changes nothing but a link-local address's interface (the kernel
        # ignores it otherwise), yet makes the address unequal to the same one without it.
        ip = ipaddress.IPv6Address(int(ip))
    if isinstance(ip, ipaddress.IPv6Address):
        # An address that embeds an IPv4 one reaches that IPv4 address: judge that instead.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _address_kind(embedded)
    if ip in _CLOUD_METADATA:
        return "a cloud metadata service's"
    if ip.is_loopback:
        return _LOOPBACK
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10, deprecated
        return "a site-local"
    if ip.is_link_local:
        return "a link-local (cloud metadata lives here)"
    if ip.is_unspecified:
        return "an unspecified"
    # Multicast is checked explicitly: `is_global` is true for some multicast ranges.
    if ip.is_multicast:
        return "a multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return _CARRIER_GRADE_NAT
    if ip in _IETF_PROTOCOL and ip not in _GLOBAL_IETF_PROTOCOL:
        return "an IETF protocol assignment (not globally routable)"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast"
    if ip.is_reserved:  # before private, which Python's 240.0.0.0/4 is too
        return "a reserved"
    if any(ip in net for net in _DOCUMENTATION):
        return "a documentation (not routed)"
    if ip in _BENCHMARKING:
        return "a benchmarking (not routed)"
    if any(ip in net for net in _PRIVATE_NETWORKS):
        return _PRIVATE
    if ip.is_private:
        return "a special-purpose (not globally routable)"
    if not ip.is_global:
        return "a not globally routable"
    return None


def _parse_ip(text: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _checked_form(url: str) -> tuple[str, int | None]:
    """Refuse a callback URL that is malformed; the host its delivery connects to (a name
    in the IDNA 2008 ASCII form the HTTP client looks up: "faß.de" is "xn--fa-hia.de",
    where Python's own codec would look up "fass.de", another domain) and its port. Looks
    nothing up.

    Raises:
        InvalidCallbackUrl: With a message saying what is wrong.
    """
    if len(url) > MAX_URL_CHARS:
        raise InvalidCallbackUrl(
            f"callback_url is {len(url)} characters; at most {MAX_URL_CHARS} are accepted"
        )
    # urlsplit drops tabs and newlines silently, so the host checked below would not be
    # the URL stored; the HTTP client refuses such a URL at delivery.
    if any(char.isspace() or not char.isprintable() for char in url):
        raise InvalidCallbackUrl(
            "callback_url contains whitespace or control characters; percent-encode them"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        # The request the delivery sends, built once now: a host the HTTP client cannot
        # decode (a malformed IDNA label such as "xn--") would fail every delivery.
        connects_to = httpx.Request("POST", url).url.raw_host.decode("ascii")
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidCallbackUrl(f"callback_url is not a valid URL: {exc}") from None
    if port == 0:
        raise InvalidCallbackUrl("callback_url port is 0; expected 1 to 65535")
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidCallbackUrl(
            f"callback_url scheme is {parts.scheme or 'missing'!r}; expected http or https"
        )
    host = parts.hostname
    if not host:
        raise InvalidCallbackUrl("callback_url has no host; expected http(s)://host/path")
    if "@" in parts.netloc:
        raise InvalidCallbackUrl(
            "callback_url contains credentials (user:password@); put secrets elsewhere"
        )
    return connects_to, port


def check_callback_url(url: str, *, allow_private: bool, look_up: bool = True) -> None:
    """Refuse a callback URL that is malformed, names a host that does not resolve, or,
    unless allowed, points at a private address.

    Blocking (resolves the host name): call it in a thread from async code.

    Args:
        url: The callback URL as submitted.
        allow_private: Allow loopback and private networks too, for trusted networks.
        look_up: Look a host name up; without, only the URL's form and an address
            written in it are checked (each connection checks the addresses it reaches).

    Raises:
        InvalidCallbackUrl: With a message saying what is wrong.
        CallbackLookupFailed: DNS failed to answer for the host, for now.
    """
    host, port = _checked_form(url)
    literal = _parse_ip(host)
    if literal is not None:
        reason = _refusal_reason(literal, allow_private=allow_private)
        if reason is not None:
            raise InvalidCallbackUrl(
                f"callback_url host {host} is {reason} address; "
                f"{_refusal_hint(reason, allow_private)}"
            )
        return
    if not look_up:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_NAME:
            raise InvalidCallbackUrl(f"callback_url host {host!r} does not resolve") from None
        # DNS failing to answer, or this host short of resources, says nothing of the URL.
        raise CallbackLookupFailed(
            f"callback_url host {host!r} could not be looked up just now ({exc.strerror}); "
            "retry shortly"
        ) from None
    except UnicodeError:
        raise InvalidCallbackUrl(f"callback_url host {host!r} does not resolve") from None
    except OSError as exc:
        raise CallbackLookupFailed(
            f"callback_url host {host!r} could not be looked up just now ({exc}); retry shortly"
        ) from None
    # Every answer must pass: the connection may use any of them.
    for *_, sockaddr in infos:
        reason = _refusal_reason(ipaddress.ip_address(sockaddr[0]), allow_private=allow_private)
        if reason is not None:
            # Not the address itself: a client must not learn what internal names resolve to.
            raise InvalidCallbackUrl(
                f"callback_url host {host!r} resolves to {reason} address; "
                f"{_refusal_hint(reason, allow_private)}"
            )


def host_to_look_up(url: str) -> str | None:
    """The host name a callback URL's check looks up (as ``check_callback_url`` does), or
    None where the URL names an address.

    Raises:
        InvalidCallbackUrl: The URL is malformed.
    """
    host, _ = _checked_form(url)
    return None if _parse_ip(host) is not None else host


def sign(body: bytes, secret: str) -> str:
    """The X-Signature-256 header value: 'sha256=' and the hex HMAC-SHA256 of `body`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class _AddressRefused(httpcore.ConnectError):
    """The connect-time check refused the address a host name resolved to."""


class _ResolvingBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host itself, on the threads of `lookups`, and connects to the addresses
    it got: only when all of them are globally routable (or, with `allow_private`, loopback
    or of a private network).

    Connecting to the vetted IP rather than the name closes the gap between check and use
    that DNS rebinding exploits. TLS is unaffected: httpcore passes the URL's host name to
    `start_tls`, so SNI and certificate checks still use the name. Threads of its own: a
    resolver that hangs must not hold asyncio's default executor, which the rest of the
    server shares (metrics, task submissions, shutdown).
    """

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend, lookups: Executor, *, allow_private: bool
    ) -> None:
        self._inner = inner
        self._lookups = lookups
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first usable address of `host`, after vetting all of them."""
        addresses = await self._resolve(host, port, timeout)
        for ip in addresses:
            reason = _refusal_reason(ip, allow_private=self._allow_private)
            if reason is not None:
                # The task's owner reads this: the address a name resolved to is not shown.
                raise _AddressRefused(
                    f"refused to connect to {host}: {reason} address; "
                    f"{_refusal_hint(reason, self._allow_private)}"
                )
        connect = partial(
            self._inner.connect_tcp,
            port=port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )
        return await self._connect_first(
            [partial(connect, str(ip)) for ip in _alternating_families(addresses)]
        )

    @staticmethod
    async def _connect_first(
        connects: list[Callable[[], Awaitable[httpcore.AsyncNetworkStream]]],
    ) -> httpcore.AsyncNetworkStream:
        """The first connection made, as Happy Eyeballs (RFC 8305) makes it: each address is
        tried `HAPPY_EYEBALLS_DELAY_S` after the one before it began, or as soon as that
        one failed, so one that does not answer (a broken IPv6 route) costs a moment, not
        the attempt's whole timeout. The others are then cancelled, or closed."""
        pending: set[asyncio.Task[httpcore.AsyncNetworkStream]] = set()
        errors: list[BaseException] = []
        made: list[httpcore.AsyncNetworkStream] = []

        def collect(done: set[asyncio.Task[httpcore.AsyncNetworkStream]]) -> None:
            for task in done:
                if (error := task.exception()) is None:
                    made.append(task.result())
                else:
                    errors.append(error)

        try:
            for connect in connects:
                pending.add(asyncio.ensure_future(connect()))
                done, pending = await asyncio.wait(
                    pending, timeout=HAPPY_EYEBALLS_DELAY_S, return_when=asyncio.FIRST_COMPLETED
                )
                collect(done)
                if made:
                    return made.pop(0)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                collect(done)
                if made:
                    return made.pop(0)
        finally:
            for task in pending:
                task.cancel()
            # Shielded: a second cancel of the caller must not leave a connection open.
            await asyncio.shield(_close_unused(pending, made))
        raise errors[-1]  # the last to fail: every one did, and connects is never empty

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: a callback never goes to a local socket."""
        raise _AddressRefused(f"refused to connect to unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        """Sleep through the wrapped backend."""
        await self._inner.sleep(seconds)

    async def _resolve(self, host: str, port: int, limit_s: float | None) -> list[_IPAddress]:
        literal = _parse_ip(host)
        if literal is not None:
            return [literal]
        lookup = partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(limit_s):
                infos = await asyncio.get_running_loop().run_in_executor(self._lookups, lookup)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except (OSError, UnicodeError):
            raise httpcore.ConnectError(f"{host} does not resolve") from None
        addresses: list[_IPAddress] = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve")
        return addresses


def _alternating_families(addresses: list[_IPAddress]) -> list[_IPAddress]:
    """``addresses`` with IPv6 and IPv4 taking turns, beginning with the first one's (RFC
    8305, 4): several unreachable addresses of one family do not each delay the other."""
    first = [ip for ip in addresses if ip.version == addresses[0].version]
    other = [ip for ip in addresses if ip.version != addresses[0].version]
    return [ip for pair in itertools.zip_longest(first, other) for ip in pair if ip is not None]


async def _close_unused(
    cancelled: set[asyncio.Task[httpcore.AsyncNetworkStream]],
    made: list[httpcore.AsyncNetworkStream],
) -> None:
    """Close the connections that are not needed: ``made``, and those of the cancelled
    tries that connected anyway, in the same instant."""
    for outcome in await asyncio.gather(*cancelled, return_exceptions=True):
        if isinstance(outcome, httpcore.AsyncNetworkStream):
            made.append(outcome)
    for stream in made:
        with contextlib.suppress(Exception):
            await stream.aclose()


class _ResolvingTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool with a `_ResolvingBackend`."""

    def __init__(
        self, lookups: Executor, *, allow_private: bool, ca_file: Path | None = None
    ) -> None:
        super().__init__(trust_env=False)
        # The public CAs (certifi's), not the environment's SSL_CERT_FILE: what is trusted
        # is set here, as the proxies are.
        tls = httpx.create_ssl_context(trust_env=False)
        if ca_file is not None:
            tls.load_verify_locations(cafile=ca_file)
        # httpx 0.28 offers no way to pass a network backend, so the pool it built is
        # replaced with one that has ours (it has opened no connection yet).
        # httpx's own limits, not httpcore's smaller defaults (10 connections, kept open
        # for ever): deliveries must not queue for a connection while their timeout runs.
        limits = httpx.Limits()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_ResolvingBackend(
                httpcore.AnyIOBackend(), lookups, allow_private=allow_private
            ),
        )


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """How callbacks are sent; validated on creation.

    Attributes:
        secret: Key for the X-Signature-256 header; None sends callbacks unsigned.
        max_attempts: Attempts per delivery, counting earlier ones across restarts.
        timeout_s: Limit on one attempt, from connecting to the response headers.
        backoff_initial_s: Scale of the exponential backoff between attempts.
        backoff_max_s: Cap on one wait between attempts.
        allow_private: Allow callbacks to loopback and private networks (not link-local,
            multicast, reserved or unrouted addresses).
        ca_file: CA certificates (PEM) that HTTPS callbacks trust besides the public ones.
    """

    secret: str | None = None
    max_attempts: int = 15
    timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    allow_private: bool = False
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        # The settings behind each field are named so that a startup error says what to fix.
        if self.secret is not None and not self.secret:
            raise ValueError(
                "webhook secret is empty; set WEBHOOK_SECRET to a key, or unset it "
                "to send unsigned callbacks"
            )
        if self.max_attempts < 1:
            raise ValueError(
                f"max_attempts is {self.max_attempts}; WEBHOOK_MAX_ATTEMPTS must be at least 1"
            )
        if self.timeout_s <= 0:
            raise ValueError(
                f"timeout_s is {self.timeout_s}; WEBHOOK_TIMEOUT_S must be more than 0"
            )
        if self.backoff_initial_s < 0:
            raise ValueError(
                f"backoff_initial_s is {self.backoff_initial_s}; WEBHOOK_BACKOFF_S must be 0 "
                "or more"
            )
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s is {self.backoff_max_s}, below backoff_initial_s "
                f"({self.backoff_initial_s}); raise WEBHOOK_BACKOFF_MAX_S or lower "
                "WEBHOOK_BACKOFF_S"
            )


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one delivery attempt ended, and what comes next.

    Attributes:
        attempts: Attempts made in all, this one included; unchanged when none was made
            (a URL refused before sending, or connecting to an address it refuses, or no
            attempts left).
        error: Why it failed; None when the callback answered 2xx.
        retry_in_s: The wait before the next attempt; None when the delivery is over:
            delivered, refused for good, or out of attempts.
    """

    attempts: int
    error: str | None
    retry_in_s: float | None

    @property
    def delivered(self) -> bool:
        """Whether the receiver took the delivery (a 2xx answer)."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class _Outcome:
    error: str | None
    retryable: bool
    retry_after_s: float | None = None  # what the receiver asked for (429, 503)
    # False when no connection was made, the address refused: the receiver had nothing.
    sent: bool = True


def _describe(exc: httpx.TransportError, timeout_s: float) -> str:
    """Short readable text for a failed request; never a traceback."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout_s} s"
    message = str(exc)
    if _is_refused_address(exc):
        return message
    cause: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name does not resolve"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.RemoteProtocolError):
        # h11 quotes the bytes it could not parse after a colon ("illegal header line:
        # bytearray(b'...')"): what the receiver sent stays out of the task's status, which
        # its submitter reads.
        message = message.partition(":")[0]
    if message:
        return f"{type(exc).__name__}: {logs.shortened(message, DESCRIBED_ERROR_MAX_CHARS)}"
    if isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError):
        return f"{type(exc).__name__}: the receiver closed or reset the connection"
    return type(exc).__name__


def _redirect_described(target: httpx.URL) -> str:
    """Where a redirect not followed points, for the delivery's error: the address to give
    as callback_url instead (http:// sent to https://, say). Without credentials, query or
    fragment, which may hold the receiver's secrets: the error shows in the task's status
    and the logs."""
    if target.scheme not in ("http", "https"):
        return f"a redirect to a {logs.shortened(target.scheme, 16)!r} URL, which is not followed"
    bare = target.copy_with(username=None, password=None, query=None, fragment=None)
    parts = {"credentials": target.userinfo, "query": target.query, "fragment": target.fragment}
    if dropped := [name for name, value in parts.items() if value]:
        named = ", ".join(dropped[:-1]) + " and " + dropped[-1] if len(dropped) > 1 else dropped[0]
        left_out = f" (its {named} left out)"
    else:
        left_out = ""
    return (
        f"a redirect to {logs.shortened(str(bare), DESCRIBED_ERROR_MAX_CHARS)}{left_out}, "
        "which is not followed: give the address it redirects to as callback_url"
    )


def _retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's wait in seconds (a number of seconds or an HTTP date), or None
    for none or one that does not parse."""
    if value is None:
        return None
    value = value.strip()
    first = value.split(",")[0].strip()  # headers sent twice arrive joined by a comma
    if first.isascii() and first.isdigit():
        return float(first)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # asctime's form, which is always GMT
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _is_refused_address(exc: BaseException) -> bool:
    # httpx re-raises httpcore's errors as its own, `from` the original.
    return isinstance(exc.__cause__, _AddressRefused)


class WebhookSender:
    """Sends callbacks over one shared HTTP client; close it with `aclose`."""

    def __init__(self, config: WebhookConfig) -> None:
        self._config = config
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="webhook-lookup")
        self._client = httpx.AsyncClient(
            transport=_ResolvingTransport(
                self._lookups, allow_private=config.allow_private, ca_file=config.ca_file
            ),
            trust_env=False,
            follow_redirects=False,
            timeout=config.timeout_s,
        )

    async def attempt(
        self,
        url: str,
        payload: Mapping[str, object],
        *,
        attempts_done: int = 0,
        last_cut_off: bool = False,
    ) -> Attempt:
        """POST `payload` as JSON to `url` once, and say whether and when to try again.

        One attempt at a time, so that the caller holds nothing while a delivery waits
        between attempts: it stores the wait and claims the delivery again when it is due.

        Args:
            url: The callback URL; its form is checked here, its addresses on connecting.
            payload: The JSON body.
            attempts_done: Attempts made before (here or before a restart); they count
                against `max_attempts`, number this one and set the wait after it.
            last_cut_off: The last of them was cut off by a shutdown (``cut_off``): if it
                was the last allowed, it is made again rather than the delivery given up,
                since the receiver may not have had it.
        """
        config = self._config
        if attempts_done >= config.max_attempts and not last_cut_off:
            return Attempt(
                attempts_done,
                f"no attempts left: {attempts_done} made, max_attempts is "
                f"{config.max_attempts} (WEBHOOK_MAX_ATTEMPTS)",
                retry_in_s=None,
            )
        try:
            # The form only: the addresses are checked when each connection opens, where a
            # name that does not resolve for now is a failed attempt to retry, not the end.
            _checked_form(url)
        except InvalidCallbackUrl as exc:
            return Attempt(attempts_done, str(exc), retry_in_s=None)

        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if config.secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, config.secret)
        outcome = await self._post(url, body, headers)
        attempts = attempts_done + outcome.sent
        retry_in_s = None
        if outcome.retryable and attempts < config.max_attempts:
            retry_in_s = self._backoff_s(attempts)
            if outcome.retry_after_s is not None:
                # A receiver that says when to come back is not hammered sooner; nor does
                # it hold a delivery past the longest wait the settings allow.
                # Up to a tenth more: deliveries refused together do not return together.
                asked_s = outcome.retry_after_s * random.uniform(1.0, 1.1)
                retry_in_s = max(retry_in_s, min(asked_s, config.backoff_max_s))
        return Attempt(attempts, outcome.error, retry_in_s)

    def cut_off(self, *, attempts_done: int) -> Attempt:
        """An attempt cut off before its answer (the worker stopping), perhaps after the
        receiver had it: counted, so that the count says how many POSTs the receiver may
        have had, and tried again after a backoff, even if it was the last allowed (see
        ``attempt``'s ``last_cut_off``)."""
        return Attempt(
            attempts_done + 1, CUT_OFF_ERROR, retry_in_s=self._backoff_s(attempts_done + 1)
        )

    def _backoff_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th attempt: exponential, with equal jitter."""
        config = self._config
        ceiling_s = min(config.backoff_max_s, config.backoff_initial_s * 2 ** (attempts - 1))
        # At least half the ceiling, so that the attempts together span a known time (a
        # receiver down for less than that still gets its webhook); the other half spreads
        # the retries of deliveries that failed together.
        return random.uniform(ceiling_s / 2, ceiling_s)

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> _Outcome:
        timeout_s = self._config.timeout_s
        try:
            # httpx's timeout is per read; this one bounds the whole attempt, so a receiver
            # trickling its headers cannot hold a delivery for longer.
            async with asyncio.timeout(timeout_s):
                # Streamed and never read: only the status matters, and a receiver must not
                # make us download a large body.
                async with self._client.stream(
                    "POST", url, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    retry_after_s = _retry_after_s(response.headers.get("retry-after"))
                    # Built by httpx for a redirect (301, 302, 303, 307, 308 with a
                    # Location), and not followed.
                    redirect = response.next_request
        except TimeoutError:
            return _Outcome(f"timed out after {timeout_s} s", retryable=True)
        except httpx.TransportError as exc:
            if str(exc).startswith(INVALID_LOCATION):
                return _Outcome(INVALID_REDIRECT, retryable=False)
            transient = httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
            if _is_refused_address(exc):
                return _Outcome(_describe(exc, timeout_s), retryable=False, sent=False)
            return _Outcome(_describe(exc, timeout_s), retryable=isinstance(exc, transient))
        except httpx.InvalidURL as exc:
            # callback_url was made a request of when it was submitted: what httpx could
            # not make a URL of is the answer's Location, made whole from it.
            return _Outcome(f"{INVALID_REDIRECT} ({exc})", retryable=False)
        if 200 <= status < 300:
            return _Outcome(None, retryable=False)
        retryable = status >= 500 or status in (408, 429)
        error = f"callback answered {status}"
        if redirect is not None:
            error += f", {_redirect_described(redirect.url)}"
        return _Outcome(
            error,
            retryable=retryable,
            retry_after_s=retry_after_s if status in (429, 503) else None,
        )

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()
        # A lookup still hanging is left to end on its own thread.
        self._lookups.shutdown(wait=False, cancel_futures=True)
