"""Outbound HTTP to URLs that tenants choose (webhook subscriptions) stays off our network.

A webhook URL is typed by a tenant's administrator or an API client, and the
server POSTs to it: without a guard that is a way to reach what only the server
can reach (its database port, an admin interface on localhost, a cloud metadata
service at 169.254.169.254). So, unless the operator allows private networks
(``PASSERELLE_WEBHOOK_ALLOW_PRIVATE_NETWORKS``, for receivers on a LAN and for
development):

- :func:`check_url` refuses, when a subscription is created, URLs whose host is
  ``localhost`` or a literal address that is not public;
- :func:`guarded_session` checks the address each connection actually reached,
  after connecting and before a byte is sent, so a host name whose DNS answer
  changes between a check and the request (rebinding) cannot slip through either.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from app.infra.http import new_session

ALLOW_HINT = "set PASSERELLE_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true to allow private receivers"


class BlockedAddress(Exception):  # reads as what happened
    """A connection reached an address outside the public internet.

    Not an OSError on purpose: urllib3 would take it for a network hiccup and
    retry; this one is a decision, reported as such.
    """


def is_public(address: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, *, allow_private: bool) -> None:
    """ValueError naming what is wrong with a webhook URL, before it is stored."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("the URL must be absolute and start with https:// "
                         "(or http:// for local tests)")
    if parts.username or parts.password:
        raise ValueError("the URL must not carry a user name or password; "
                         "receivers verify the signature header instead")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError("the URL's port is not a number between 1 and 65535") from None
    if allow_private:
        return
    host = parts.hostname.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise ValueError(f"the URL points at this server (localhost); {ALLOW_HINT}")
    try:
        literal = not is_public(host)
    except ValueError:
        return  # a host name: its addresses are checked on every connection
    if literal:
        raise ValueError(f"{host} is not a public address; {ALLOW_HINT}")


class _CheckPeer:
    """Mixed into urllib3's connections: refuse the socket if its peer is not public."""

    def _new_conn(self) -> Any:
        sock = super()._new_conn()  # type: ignore[misc]  # a mixin: urllib3's class is next
        peer = sock.getpeername()[0]
        if not is_public(peer):
            sock.close()
            raise BlockedAddress(f"{peer} is not a public address; {ALLOW_HINT}")
        return sock


class _GuardedHTTPConnection(_CheckPeer, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_CheckPeer, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool,
                                                   "https": _GuardedHTTPSPool}

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        # Through a proxy the socket's peer is the proxy, not the receiver: the guard
        # could not see where the request goes, so proxies are not used.
        raise BlockedAddress("webhook deliveries do not go through proxies")


def guarded_session(*, allow_private: bool, user_agent: str = "Passerelle/1") -> requests.Session:
    """A requests session for tenant-chosen URLs (plain when private networks are allowed)."""
    session = new_session(user_agent)
    if not allow_private:
        session.trust_env = False  # no proxies from the environment, see _GuardedAdapter
        adapter = _GuardedAdapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session
