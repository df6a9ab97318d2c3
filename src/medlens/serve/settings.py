"""``ServeSettings``: what ``medlens serve`` was started with, and the checks made before anything binds."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from medlens.errors import ConfigError
from medlens.serve.auth import API_KEYS_ENV

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_upload_bytes: int = 256 * 1024 * 1024
    timeout_s: float = 120.0
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 64
    threads: int | None = None
    backend: str = "auto"
    names: dict[str, str] = field(default_factory=dict)
    read_timeout_s: float = 60.0                # request headers, and the whole body, must arrive within this
    allowed_hosts: tuple[str, ...] = ()         # Host header values accepted besides localhost and the bind address
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_incomplete: bool = False
    allow_out_of_profile: bool = False         # answer inputs outside a run's training profile (reasons attached)

    @property
    def auth(self) -> bool:
        return bool(self.api_keys)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def host_allowed(self) -> set[str]:
        """Host names (lower case, no port) that the Host header may carry; ``*`` accepts any."""
        hosts = {*DEFAULT_ALLOWED_HOSTS, *(h.strip().lower().strip("[]").rstrip(".") for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):
            hosts.add(self.host.lower().strip("[]"))
        if not is_local(self.host):      # this machine's own name (a rebinding attacker's names are never it)
            hosts.add(socket.gethostname().lower())
        return hosts


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def check_binding(settings: ServeSettings) -> None:
    if not is_local(settings.host) and not settings.auth:
        raise ConfigError(f"serving on {settings.host} (not localhost) requires API keys: set {API_KEYS_ENV} or "
                          "give --api-key-file")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if not settings.read_timeout_s > 0:
        raise ConfigError(f"--read-timeout must be a positive number of seconds, not {settings.read_timeout_s}")
    if not settings.max_upload_bytes > 0:
        raise ConfigError("--max-upload-mb must be positive")


_HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]{1,5})?$")


def host_of(header: str) -> str:
    """The host name of a Host header value, lower case, without port, brackets or a trailing dot; '' when
    the value is not a plain host[:port] (userinfo, paths, spaces and the like are never matched)."""
    m = _HOST_HEADER.match(header.strip().lower())
    if not m:
        return ""
    return m.group("v6") or m.group("name").rstrip(".")
