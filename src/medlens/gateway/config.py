"""The gateway's YAML: where it listens, who may send, how series are routed to runs, where results go.

Read with the bounded YAML loader (``medlens.safe_yaml``) and validated strictly with pydantic: unknown keys,
bad AE titles, ports, regular expressions and ranges are one-line ``ConfigError``s naming the file. Relative
paths (spool, audit log, queue, run folders) are resolved against the config file's folder. The site key that
hashes UIDs in the audit trail is never written in the YAML: ``site_key_env`` names the environment variable
that holds it.

Example::

    listen: {ae_title: MEDLENS_GW, host: 127.0.0.1, port: 11112}
    allowed_aets: [MODALITY1, ORTHANC]
    quiet_period_s: 5
    spool: spool/
    audit: audit.jsonl
    site_key_env: MEDLENS_SITE_KEY
    metrics: {host: 127.0.0.1, port: 9109}
    stow: {host: 127.0.0.1, port: 8043}        # optional: STOW-RS on the serve app (API keys as for serve)
    rules:
      - name: chest-xray
        match: {modality: [DX, CR], body_part: [CHEST]}
        runs: [runs/pneumoniamnist_cnn]
    destinations:
      - {name: pacs, kind: dimse, url: "dimse://ORTHANC@127.0.0.1:4242"}
    retry: {base_s: 2, max_s: 60}
    ups: {subscribers: {AIREQUESTER: "127.0.0.1:11113"}}   # optional: the AIW-I UPS worklist (also --ups)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medlens.errors import ConfigError
from medlens.safe_yaml import safe_load_yaml

_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 AE: 16 characters, default repertoire, no backslash
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _aet(v: str, what: str) -> str:
    v = v.strip()
    if not v or not _AET.fullmatch(v):
        raise ValueError(f"{what} {v!r} is not a DICOM AE title (1 to 16 printable characters, no backslash)")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Listen(_Strict):
    ae_title: str = "MEDLENS_GW"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _t(cls, v: str) -> str:
        return _aet(v, "listen.ae_title")


class MetricsListen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)  # 0: any free port (the gateway prints none; for tests)


class StowListen(_Strict):
    """The STOW-RS receiver on the serve app: API keys from ``$MEDLENS_API_KEYS`` and/or ``api_key_file``
    (required unless bound to this machine, as for ``medlens serve``)."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    api_key_file: Path | None = None
    max_upload_mb: float = Field(default=512.0, gt=0)


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self

    def holds(self, v: float | None) -> bool:
        if v is None:
            return False
        return (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


class Match(_Strict):
    """What a series must show for a rule to take it; every given condition must hold (an absent one is any)."""

    modality: list[str] | None = None          # DICOM Modality, e.g. [DX, CR]
    body_part: list[str] | None = None         # BodyPartExamined, e.g. [CHEST]
    sop_class_uid: list[str] | None = None     # SOP Class UIDs
    series_description: str | None = None      # a regular expression searched in SeriesDescription
    pixel_spacing_mm: Range | None = None      # the in-plane pixel spacing (the smaller of the two), mm
    slices: Range | None = None                # the number of instances in the series

    @field_validator("modality", "body_part")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return [s.strip().upper() for s in v] if v is not None else None

    @field_validator("sop_class_uid")
    @classmethod
    def _uids(cls, v: list[str] | None) -> list[str] | None:
        for u in v or []:
            if len(u) > 64 or not _UID.fullmatch(u):
                raise ValueError(f"{u!r} is not a DICOM UID")
        return v

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"series_description {v!r} is not a regular expression ({e})") from None
        return v


class Shadow(_Strict):
    """A new version of one of the rule's runs in shadow mode (``gateway.shadow``): it predicts every series the
    rule takes; its outputs are recorded (queue file, audit trail) and never sent. ``of``: the run it is a new
    version of (left out when the rule has one run)."""

    run: Path
    of: Path | None = None


class PreviousVersion(_Strict):
    """A version replaced by ``medlens gateway promote`` (kept in the YAML, newest last)."""

    run: Path
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    replaced_by: Path
    replaced_at: str = Field(min_length=1, max_length=64)


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=64)
    match: Match = Match()
    runs: list[Path] = Field(min_length=1)
    shadow: Shadow | None = None
    previous: list[PreviousVersion] = []

    @model_validator(mode="after")
    def _shadow(self) -> "Rule":
        s = self.shadow
        if s is None:
            return self
        if s.of is None and len(self.runs) > 1:
            raise ValueError(f"rule {self.name}: shadow.of must name which of its {len(self.runs)} runs the shadow is "
                             "a new version of")
        if s.of is not None and s.of not in self.runs:
            raise ValueError(f"rule {self.name}: shadow.of {s.of} is not one of its runs")
        if s.run in self.runs:
            raise ValueError(f"rule {self.name}: the shadow run {s.run} is already one of its runs")
        return self

    @property
    def shadowed(self) -> Path | None:
        """The run the shadow is a new version of (None without a shadow)."""
        if self.shadow is None:
            return None
        return self.shadow.of if self.shadow.of is not None else self.runs[0]

    def resolved(self, base: Path) -> "Rule":
        """The rule with its run paths (runs, shadow, previous versions) resolved against ``base``."""
        shadow = self.shadow
        if shadow is not None:
            shadow = Shadow(run=_resolve(shadow.run, base), of=_resolve(self.shadowed or shadow.run, base))
        previous = [v.model_copy(update={"run": _resolve(v.run, base), "replaced_by": _resolve(v.replaced_by, base)})
                    for v in self.previous]
        return self.model_copy(update={"runs": [_resolve(p, base) for p in self.runs], "shadow": shadow,
                                       "previous": previous})


class Destination(_Strict):
    """Where results go: ``dimse`` (C-STORE to ``dimse://AET@host:port``), ``stow`` (STOW-RS to a DICOMweb
    root), ``fhir`` (a transaction Bundle POSTed to a FHIR base URL)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dimse", "stow", "fhir"]
    url: str = Field(min_length=1)

    @model_validator(mode="after")
    def _url(self) -> "Destination":
        if self.kind == "dimse" and not self.url.startswith("dimse://"):
            raise ValueError(f"destination {self.name}: a dimse destination is dimse://AET@host:port")
        if self.kind in ("stow", "fhir") and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"destination {self.name}: a {self.kind} destination is an http(s) URL")
        return self


class Retry(_Strict):
    """Exponential backoff with jitter: attempt n waits ``min(max_s, base_s * 2**n)`` times a factor drawn in
    [1 - jitter, 1 + jitter]. ``max_attempts``: after that many failed attempts a delivery is marked failed
    (visible in ``gateway status``); unset, it is retried until the destination answers."""

    base_s: float = Field(default=2.0, gt=0)
    max_s: float = Field(default=300.0, gt=0)
    jitter: float = Field(default=0.5, ge=0, lt=1)
    max_attempts: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)  # connect/read timeout of one delivery


class Drift(_Strict):
    """Rolling drift per run (``gateway.drift``): over the last ``window`` series, once ``min_samples`` are in;
    an alert when a PSI passes ``psi_alert`` or a KS statistic ``ks_alert``."""

    window: int = Field(default=50, ge=2, le=100_000)
    min_samples: int = Field(default=10, ge=1)
    psi_alert: float = Field(default=0.25, gt=0)
    ks_alert: float = Field(default=0.3, gt=0, le=1)

    @model_validator(mode="after")
    def _n(self) -> "Drift":
        if self.min_samples > self.window:
            raise ValueError(f"drift.min_samples {self.min_samples} is larger than drift.window {self.window}")
        return self


class Ups(_Strict):
    """The AIW-I worklist (``gateway.ups``; also turned on by ``medlens gateway CONFIG --ups``): a DIMSE UPS SCP
    (Push, Pull, Watch, Query; UPS Event reports sent) on the gateway's AE, same AE-title allow-list.
    ``subscribers``: AE title -> ``host:port`` where that AE takes its N-EVENT-REPORTs (an AE not listed here
    cannot subscribe: 0xC308); ``event_timeout_s``: connect/answer timeout of one event report."""

    subscribers: dict[str, str] = {}
    event_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("subscribers")
    @classmethod
    def _subscribers(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for aet, where in v.items():
            host, sep, port = str(where).rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"ups.subscribers: {where!r} is not host:port")
            out[_aet(aet, "ups.subscribers:")] = f"{host}:{int(port)}"
        return out


class GatewayConfig(_Strict):
    listen: Listen = Listen()
    allowed_aets: list[str] = Field(min_length=1)
    quiet_period_s: float = Field(default=10.0, ge=0)
    poll_s: float = Field(default=0.5, gt=0, le=60)
    spool: Path
    queue: Path | None = None     # default: <spool>/queue.sqlite
    audit: Path
    site_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    metrics: MetricsListen | None = None
    stow: StowListen | None = None
    rules: list[Rule] = Field(min_length=1)
    destinations: list[Destination] = Field(min_length=1)
    retry: Retry = Retry()
    drift: Drift = Drift()
    ups: Ups | None = None        # the AIW-I UPS worklist (gateway.ups)
    allow_unencrypted: bool = False  # plain DIMSE/http to another host (the io.net rule); this machine is always allowed

    @field_validator("allowed_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [_aet(a, "allowed_aets:") for a in v]

    @model_validator(mode="after")
    def _unique(self) -> "GatewayConfig":
        for what, names in (("rule", [r.name for r in self.rules]), ("destination", [d.name for d in self.destinations])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} name(s) used twice: {', '.join(dup)}")
        return self

    @property
    def queue_path(self) -> Path:
        return self.queue or self.spool / "queue.sqlite"

    def site_key(self, source: str | Path | None = None) -> bytes:
        """The site key from ``$<site_key_env>`` (at least 16 characters), or a one-line error."""
        key = os.environ.get(self.site_key_env, "")
        if len(key) < 16:
            raise ConfigError(f"site_key_env: ${self.site_key_env} must hold the site key (at least 16 characters) "
                              "that hashes UIDs in the audit trail", source)
        return key.encode("utf-8")


def _format(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            msgs.append(f"unknown key '{key}'")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        msgs.append(f"'{key}': {msg}" if key else msg)
    return "; ".join(msgs)


def _resolve(p: Path, base: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway YAML; relative paths resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the gateway config ({type(e).__name__})", path) from None
    raw = safe_load_yaml(text, path)
    if not isinstance(raw, dict):
        raise ConfigError("a gateway config is a YAML mapping (listen, allowed_aets, rules, destinations, ...)", path)
    try:
        cfg = GatewayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e), path) from None
    base = path.resolve().parent
    rules = [r.resolved(base) for r in cfg.rules]
    stow = cfg.stow
    if stow is not None and stow.api_key_file is not None:
        stow = stow.model_copy(update={"api_key_file": _resolve(stow.api_key_file, base)})
    return cfg.model_copy(update={"stow": stow, "spool": _resolve(cfg.spool, base), "audit": _resolve(cfg.audit, base),
                                  "queue": _resolve(cfg.queue, base) if cfg.queue else None, "rules": rules})
