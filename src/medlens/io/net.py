"""Outbound connections (PACS over DICOMweb or DIMSE, FHIR servers): where they may go, how long they may take,
how much they may bring back, and which remote values may name a file.

- **Where.** A URL names the host the user gave, and only that host: HTTP redirects are never followed (a
  3xx answer is a one-line error), and plain ``http://`` or DIMSE (which is not encrypted) to a host other than
  this machine (127.0.0.0/8, ::1, ``localhost``) is refused unless the caller allows it (``--allow-http``).
- **How long.** Every connection has a connect and a read timeout: ``MEDLENS_NET_TIMEOUT`` seconds (default
  60) for each read, and at most 10 s of it to connect.
- **How much.** A reply held in memory (QIDO-RS results, a STOW-RS or FHIR answer) is streamed against
  ``MEDLENS_MAX_RESPONSE_BYTES`` (default 64 MiB); a study retrieved from a PACS (WADO-RS body or C-GET
  instances) is streamed to disk against ``MEDLENS_MAX_RETRIEVE_BYTES`` (default 8 GiB); an error reply is
  read up to 64 KiB and the rest dropped. A declared ``Content-Length`` over the limit is refused before any
  of the body is read.
- **Names.** A file name built from a remote value comes from a valid DICOM UID (``uid_name``: digits and
  dots, no leading zeros, at most 64 characters) and is checked to stay inside its folder (``confined``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import requests
from pydicom.uid import RE_VALID_UID

from medlens.errors import ConfigError, DataError

TIMEOUT_ENV = "MEDLENS_NET_TIMEOUT"
MAX_RESPONSE_ENV = "MEDLENS_MAX_RESPONSE_BYTES"
MAX_RETRIEVE_ENV = "MEDLENS_MAX_RETRIEVE_BYTES"
DEFAULTS = {TIMEOUT_ENV: 60.0, MAX_RESPONSE_ENV: 2**26, MAX_RETRIEVE_ENV: 2**33}
#: connect timeout ceiling (seconds); the read timeout is the setting itself
MAX_CONNECT_S = 10.0
#: how much of an error reply is read (the rest is dropped unread)
ERROR_BODY_BYTES = 64 * 1024


def _number(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULTS[name]
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be positive and finite")
    return value


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds."""
    read = _number(TIMEOUT_ENV)
    return min(read, MAX_CONNECT_S), read


def max_response_bytes() -> int:
    return int(_number(MAX_RESPONSE_ENV))


def max_retrieve_bytes() -> int:
    return int(_number(MAX_RETRIEVE_ENV))


# ------------------------------------------------------------------------------------------ where


def shown_url(url: str) -> str:
    """A URL without any user:password part, for messages."""
    u = urlparse(url)
    if u.username is None and u.password is None:
        return url
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return u._replace(netloc=host + (f":{u.port}" if u.port else "")).geturl()


def is_local(host: str | None) -> bool:
    """This machine by name or loopback address (no DNS lookup: a name that resolves to it is not trusted)."""
    if not host:
        return False
    h = host.strip("[]").rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def require_encrypted(url: str, host: str | None, scheme: str, allow_http: bool, what: str) -> None:
    """Refuse an unencrypted scheme (``http``, ``dimse``) to a host other than this machine, unless allowed."""
    if scheme in ("http", "dimse") and not allow_http and not is_local(host):
        hint = "use https:// or" if scheme == "http" else "DIMSE is not encrypted;"
        raise ConfigError(f"{what}: {scheme}:// to another host sends patient data unencrypted; {hint} pass "
                          "--allow-http to allow it", shown_url(url))


def check_http_url(url: str, allow_http: bool, what: str) -> str:
    """An ``http(s)://host...`` URL that may be used (see ``require_encrypted``), or a one-line ConfigError."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"{what}: not an http(s):// URL with a host", shown_url(url))
    try:
        _ = u.port
    except ValueError:
        raise ConfigError(f"{what}: the port is not a number from 0 to 65535", shown_url(url)) from None
    require_encrypted(url, u.hostname, u.scheme, allow_http, what)
    return url


# ------------------------------------------------------------------------------------------ how much

class NetError(requests.exceptions.RequestException):
    """Base of the refusals below (a ``requests`` exception, so a library's retry or wrapper sees one)."""


class RedirectRefused(NetError):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status} redirect")
        self.status = status


class BodyTooLarge(NetError):
    def __init__(self, nbytes: int, limit: int, setting: str) -> None:
        super().__init__(f"{nbytes} bytes over {limit}")
        self.nbytes, self.limit, self.setting = nbytes, limit, setting

    def describe(self) -> str:
        return (f"the reply is larger than {self.limit:,} bytes ({self.nbytes:,} or more; raise {self.setting} "
                "to allow it)")


class _CappedRaw:
    """A urllib3 response whose ``stream`` stops at ``limit`` decoded bytes: it raises ``BodyTooLarge``, or
    with ``truncate`` simply ends (for error replies, of which only the start is wanted)."""

    def __init__(self, raw, limit: int, setting: str, truncate: bool = False) -> None:
        self._raw, self._limit, self._setting, self._truncate = raw, limit, setting, truncate
        self._n = 0

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def _count(self, chunk: bytes) -> bytes | None:
        """``chunk`` within the limit; None once the limit is reached (truncate), or BodyTooLarge."""
        room = self._limit - self._n
        self._n += len(chunk)
        if self._n <= self._limit:
            return chunk
        self._raw.close()
        if self._truncate:
            return chunk[:room] if room > 0 else None
        raise BodyTooLarge(self._n, self._limit, self._setting)

    def stream(self, amt: int = 2**16, decode_content: bool | None = None):
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            over = self._n + len(chunk) > self._limit
            part = self._count(chunk)
            if part:
                yield part
            if over:
                return

    def read(self, amt: int | None = None, *args, **kw) -> bytes:
        if self._n >= self._limit and self._truncate:
            return b""
        return self._count(self._raw.read(amt, *args, **kw)) or b""


def declared_length(response) -> int | None:
    try:
        n = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


def _guard(response, *args, stream: bool = False, **kwargs):
    """``requests`` response hook: refuse redirects, cap every body (see the module docstring)."""
    if response.is_redirect or 300 <= response.status_code < 400:
        response.close()
        raise RedirectRefused(response.status_code)
    if response.status_code >= 400:
        response.raw = _CappedRaw(response.raw, ERROR_BODY_BYTES, "", truncate=True)
        return response
    if stream:  # the caller reads it in chunks and counts (a retrieve to disk)
        return response
    limit = max_response_bytes()
    n = declared_length(response)
    if n is not None and n > limit:
        response.close()
        raise BodyTooLarge(n, limit, MAX_RESPONSE_ENV)
    response.raw = _CappedRaw(response.raw, limit, MAX_RESPONSE_ENV)
    return response


def session():
    """A ``requests.Session`` that follows no redirect, caps every reply and always has timeouts."""
    class _Session(requests.Session):
        def request(self, method, url, *args, **kw):
            kw["allow_redirects"] = False
            if kw.get("timeout") is None:
                kw["timeout"] = timeouts()
            return super().request(method, url, *args, **kw)

    s = _Session()
    s.max_redirects = 0
    s.hooks["response"].append(_guard)
    return s


def error_detail(response, n: int = 160) -> str:
    """The first issue of a FHIR OperationOutcome or the first line of an error reply (already capped), as one
    short line."""
    try:
        text = response.content.decode(response.encoding or "utf-8", "replace")
    except NetError:
        return ""
    detail = ""
    try:
        js = json.loads(text)
        issue = (js.get("issue") or [{}])[0] if isinstance(js, dict) else {}
        detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
    except (ValueError, AttributeError, TypeError, IndexError):
        detail = text.splitlines()[0] if text else ""
    return " ".join(str(detail).split())[:n]


# ------------------------------------------------------------------------------------------ names


def shown_value(value, n: int = 48) -> str:
    """A remote value for a message: at most ``n`` characters, control and non-ASCII characters escaped."""
    s = str(value)
    return ascii(s if len(s) <= n else s[:n] + "...")


def uid_name(value, what: str, source: str | None = None) -> str:
    """``value`` if it is a valid DICOM UID (PS3.5 9.1: digits and dots, no leading zero in a component, at
    most 64 characters), else a one-line DataError naming the attribute and (shortened) value."""
    s = str(value) if value is not None else ""
    if not isinstance(value, str) or len(s) > 64 or not re.fullmatch(RE_VALID_UID, s):
        raise DataError(f"{what} {shown_value(s)} is not a valid DICOM UID (digits and dots, at most 64 "
                        "characters); nothing was written", source)
    return s


def confined(root: Path, *parts: str, source: str | None = None) -> Path:
    """``root/parts...``, resolved and checked to stay inside ``root`` (a DataError otherwise)."""
    base = Path(root).resolve()
    p = base.joinpath(*parts).resolve()
    if p == base or base not in p.parents:
        raise DataError(f"path {shown_value('/'.join(parts))} leaves its folder; nothing was written", source)
    return p
