"""One settings object, read once at start-up (pydantic-settings).

Every variable is listed in the README's configuration table; keep the two in step.
Variables are read from the environment and then from the env file that ``make up``
writes (``.local/env`` by default, see ``BIZ_ENV_FILE``); the environment wins.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.collector import DEFAULT_GEN0

DEV_ACCESS_SECRET = "dev-only-access-token-secret-change-me-0123456789"  # noqa: S105
DEV_TRANSFER_SECRET = "dev-only-transfer-token-secret-change-me-0123456789"  # noqa: S105
DEV_PIN_PEPPER = "dev-only-pin-pepper-change-me-0123456789"
DEV_OTP_PEPPER = "dev-only-otp-pepper-change-me-0123456789"
DEV_OPERATOR_SECRET = "dev-only-operator-secret-change-me-0123456789"  # noqa: S105
#: Every development value: in production a secret equal to any of them is refused.
DEV_SECRETS = frozenset({DEV_ACCESS_SECRET, DEV_TRANSFER_SECRET, DEV_PIN_PEPPER,
                         DEV_OTP_PEPPER, DEV_OPERATOR_SECRET})
#: Bytes an HMAC key needs for each algorithm (RFC 7518 §3.2: at least the hash size).
#: The PIN and OTP peppers and the operator secret are HMAC-SHA256 keys.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: Exit status of a process refused by its environment (sysexits.h EX_CONFIG).
EXIT_CONFIG = 78


def default_env_file() -> str:
    return os.environ.get("BIZ_ENV_FILE", ".local/env")


class Settings(BaseSettings):
    """Configuration of the worker, the account center and the command-line tools."""

    # extra="ignore": a BIZ_ variable no field reads (BIZ_WEB_FORWARD_SECRET or
    # BIZ_SAGA_MAX_IN_FLIGHT of earlier versions, a typo) is ignored, never refused.
    model_config = SettingsConfigDict(
        env_prefix="BIZ_",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    environment: Literal["production", "development"] = Field(
        "production",
        description="production refuses to start with a secret unset, a development value "
        "or too short; development accepts the development secrets (make run, make test, "
        "make bench).",
    )

    # --- connections -----------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:19092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka bootstrap servers, comma separated.",
    )
    database_url: str = Field(
        "postgresql+asyncpg://bizcenter:bizcenter@127.0.0.1:15432/bizcenter",
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="SQLAlchemy URL of PostgreSQL (asyncpg driver).",
    )
    db_schema: str = Field(
        "bizcenter",
        description="PostgreSQL schema of the business center's own tables "
        "(user directory, transfer-token uses, daily-limit reservations, sagas, saved "
        "replies, the query tables).",
    )
    account_center_db_schema: str = Field(
        "account_center",
        description="PostgreSQL schema of the reference account center (accounts, journal).",
    )
    db_pool_size: int = Field(20, ge=1, description=(
        "Connections per process at most: each opened when first needed, then kept."))

    # --- Kafka topology --------------------------------------------------------------
    topic_prefix: str = Field("", description="Prefix of every topic name (test isolation).")
    topic_partitions: int = Field(
        6, ge=1, description="Partitions of every topic the application creates."
    )
    topic_replication_factor: int = Field(1, ge=1, description="Replication factor of topics.")
    app_id: str = Field(
        "bizcenter",
        description="Faust application id: the worker's consumer groups, this one (the "
        "Faust app: business.queries) and <app_id>-sagas (the saga engine's).",
    )
    account_center_group: str = Field(
        "account-center", description="Consumer group of the reference account center."
    )
    table_store: str = Field(
        "rocksdb://",
        description="Faust's table store (its app setting store=): the worker keeps no "
        "Faust table any more (every query table is PostgreSQL's), so nothing is stored "
        "there.",
    )
    data_dir: str = Field(
        ".local/worker-data", description="Faust's own data directory (its app setting "
        "datadir=, one subdirectory per app id): no table is kept by the worker there.")
    web_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's web server.")
    web_enabled: bool = Field(True, description="Serve the worker's web endpoints (the "
                              "HTTP queries, /healthz and /readyz).")
    web_bind: str = Field("127.0.0.1", description="Interface the worker's web server "
                          "listens on (0.0.0.0 for all).")
    web_host: str = Field(
        "127.0.0.1", description="Host name of this worker's web server: with "
        "BIZ_WEB_PORT it makes the worker's URL, which Faust advertises to its group and "
        "the worker logs at start with its X-Bizcenter-Served-By tag (no worker calls "
        "another).",
    )
    operator_secret: SecretStr = Field(
        SecretStr(DEV_OPERATOR_SECRET),
        description="HMAC-SHA256 key (at least 32 bytes) of operators' resolutions: "
        "bizcenter sagas resolve signs them, the workers refuse (dead-letter) any without a "
        "valid signature. The same on the workers and where operators run the command.",
    )
    account_center_web_port: int = Field(
        6067, ge=0, le=65535, description="Port of the account center's web server "
        "(/metrics, /healthz, /readyz) on BIZ_WEB_BIND; 0 turns it off.",
    )
    reconcile_interval_seconds: float = Field(
        60.0, ge=0, description="How often the account center reconciles its ledger "
        "(app/reconciliation.py), setting the reconciliation metrics and logging an alarm "
        "on drift; 0 turns the live check off.",
    )

    # --- access tokens (issued by the user center) -----------------------------------
    access_token_algorithms: list[Literal["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"]] = (
        Field(["HS256"], description="Pinned algorithms accepted for access tokens.")
    )
    access_token_key: SecretStr = Field(
        SecretStr(DEV_ACCESS_SECRET),
        description="HS* shared secret, or the PEM public key for RS256/ES256/EdDSA.",
    )
    access_token_keys: SecretStr = Field(
        SecretStr(""),
        description="Key set selected by the token's kid, a JSON list "
        '[{"kid": "...", "key": "..."}] (HS* secrets or PEM public keys). When set, every '
        "access token must name one of these kids and BIZ_ACCESS_TOKEN_KEY is not used.",
    )
    access_token_issuer: str = Field("user-center", description="Required `iss` of access tokens.")
    access_token_audience: str = Field(
        "business-center", description="Required `aud` of access tokens."
    )
    jwt_leeway_seconds: int = Field(
        10, ge=0, le=120, description="Clock leeway for exp/iat/nbf."
    )

    # --- transfer tokens (issued by this service) ------------------------------------
    transfer_token_secret: SecretStr = Field(
        SecretStr(DEV_TRANSFER_SECRET), description="HS256 key of transfer tokens."
    )
    transfer_token_ttl_seconds: int = Field(300, ge=5, description="Transfer token lifetime.")

    # --- PIN and OTP -----------------------------------------------------------------
    pin_pepper: SecretStr = Field(
        SecretStr(DEV_PIN_PEPPER), description="Server-side key of the PIN HMAC."
    )
    pin_max_attempts: int = Field(
        5, ge=1, description="Wrong PINs of one user (however spread over requests, keys, "
        "partitions and workers) before the PIN locks; a right PIN resets the count.")
    pin_lock_seconds: float = Field(
        86_400.0, gt=0, description="How long a PIN lock lasts (bizcenter users unlock ends "
        "it earlier).")
    otp_pepper: SecretStr = Field(
        SecretStr(DEV_OTP_PEPPER), description="Server-side key of the OTP HMAC."
    )
    otp_ttl_seconds: float = Field(300, gt=0, description="OTP lifetime.")
    otp_max_attempts: int = Field(5, ge=1, description="Wrong OTPs before the transfer fails.")
    otp_user_max_failures: int = Field(
        10, ge=1, description="Wrong OTPs of one user, across transfers, within "
        "BIZ_OTP_FAILURE_WINDOW_SECONDS before every step-up is refused (OTP_LOCKED).")
    otp_failure_window_seconds: float = Field(
        86_400.0, gt=0, description="Rolling window of BIZ_OTP_USER_MAX_FAILURES.")
    otp_max_sends: int = Field(
        5, ge=1, description="OTPs sent to one user within BIZ_OTP_SEND_WINDOW_SECONDS "
        "before a new step-up is refused (RATE_LIMITED).")
    otp_send_window_seconds: float = Field(
        900.0, gt=0, description="Rolling window of BIZ_OTP_MAX_SENDS.")

    # --- saga timing -----------------------------------------------------------------
    idempotency_retention_hours: float = Field(
        24, ge=24, description="How long finished sagas and replies are kept for duplicates."
    )
    purge_interval_seconds: float = Field(
        600.0, gt=0, description="How often each partition forgets the finished sagas and "
        "replies older than BIZ_IDEMPOTENCY_RETENTION_HOURS.",
    )
    account_command_timeout_seconds: float = Field(
        5.0, gt=0, description="Wait for an account event before re-sending the command."
    )
    account_command_max_backoff_seconds: float = Field(
        60.0, gt=0, description="Cap of the exponential back-off of re-sent commands."
    )
    tick_interval_seconds: float = Field(
        1.0, gt=0, description="How often each worker checks its sagas' deadlines."
    )
    producer_linger_ms: float = Field(
        2.0, ge=0, description="How long the producers of the worker, the account center and "
        "the funding provider wait to fill a batch: more batching costs less CPU per record "
        "and adds up to this much latency per hop.",
    )
    consumer_fetch_min_bytes: int = Field(
        65536, ge=1, description="Under load (above 1000 / the wait below records a "
        "second), the saga engine's and the account center's fetches wait for this much data "
        "(or the wait below) before the broker answers: fewer, fuller fetches. Below, a fetch "
        "is answered at its first byte.",
    )
    consumer_fetch_max_wait_ms: int = Field(
        10, ge=0, description="The longest the broker holds a fetch of the saga engine or the "
        "account center waiting for the minimum above (latency added per hop at low traffic).",
    )
    saga_batch_max_records: int = Field(
        500, ge=1, le=10_000, description="Records the saga engine takes in one cycle (one "
        "PostgreSQL transaction for their sagas and replies, one produce flush, one offset "
        "commit): more costs less per record and holds each record longer.",
    )
    consumer_session_timeout_seconds: float = Field(
        10.0, ge=6, le=300, description="Kafka consumer-group session timeout of the worker: "
        "a worker that died without leaving (SIGKILL, a lost host) holds its partitions this "
        "long before the group reassigns them. Kafka's broker refuses values below its "
        "group.min.session.timeout.ms (6 s by default).",
    )
    consumer_heartbeat_interval_seconds: float = Field(
        1.0, gt=0, description="How often the worker's consumer heartbeats to the group "
        "coordinator; at most a third of the session timeout.",
    )
    saga_stop_grace_seconds: float = Field(
        5.0, ge=0, description="At stop, how long the saga engine's cycle in flight may "
        "finish; otherwise it is cancelled, its records not committed, and they are "
        "delivered again.",
    )

    # --- top-ups and the reference funding provider ----------------------------------
    topup_daily_limit_minor: int = Field(
        500_000, ge=0, description="What one user may top up per UTC day, in minor units "
        "(a limit apart from the transfers' daily limit).")
    funding_timeout_seconds: float = Field(
        30.0, gt=0, description="A charge the funding provider has not answered in this "
        "time fails the top-up (FUNDING_TIMEOUT); a later capture is refunded to the source.",
    )
    funding_provider_group: str = Field(
        "funding-provider", description="Consumer group of the reference funding provider."
    )
    funding_decline_sources: list[str] = Field(
        [], description="Reference funding provider: sources whose charges are declined "
        "(JSON list).",
    )
    funding_silent_sources: list[str] = Field(
        [], description="Reference funding provider: sources whose charges get no answer "
        "(JSON list).",
    )
    funding_late_sources: list[str] = Field(
        [], description="Reference funding provider: sources captured only after "
        "BIZ_FUNDING_LATE_CAPTURE_SECONDS (JSON list).",
    )
    funding_late_capture_seconds: float = Field(
        10.0, ge=0, description="Reference funding provider: delay of a late capture."
    )

    log_level: str = Field("INFO", description="Python log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text (a terminal) or JSON objects, one per line "
        "(log collectors; app/log_format.py).",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="Event loop of every process: uvloop (less CPU per message) or "
        "the standard library's asyncio.",
    )
    gc_gen0_threshold: int = Field(
        DEFAULT_GEN0, ge=0, description="Worker, account center and funding provider: what they "
        "built at start is frozen out of the cyclic garbage collector, and its young "
        "generation collected every this many net allocations (Python's default: 700); 0 "
        "keeps Python's defaults (app/collector.py).",
    )

    @field_validator("access_token_algorithms")
    @classmethod
    def _one_family(cls, algs: list[str]) -> list[str]:
        if not algs:
            raise ValueError("at least one algorithm")
        families = {"HS" if a.startswith("HS") else "ASYM" for a in algs}
        if len(families) > 1:
            # One key cannot serve both an HMAC secret and a public key (RFC 8725 §3.1).
            raise ValueError("do not mix HMAC and public-key algorithms")
        return algs

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @field_validator("access_token_keys")
    @classmethod
    def _key_set_shape(cls, value: SecretStr) -> SecretStr:
        parse_access_token_keys(value.get_secret_value())  # ValueError names no key
        return value

    def access_token_key_set(self) -> dict[str | None, str]:
        """kid → key of the access-token verifier, in the order configured; the first
        kid is the one the development issuer signs with; ``None`` is the key of tokens
        without a kid. Without BIZ_ACCESS_TOKEN_KEYS, BIZ_ACCESS_TOKEN_KEY is the key of kid
        ``default`` and of tokens without a kid, as before key sets existed. With it,
        BIZ_ACCESS_TOKEN_KEY still verifies the tokens without a kid only when it is set
        (not empty): the move from one key to a key set."""
        entries = parse_access_token_keys(self.access_token_keys.get_secret_value())
        key = self.access_token_key.get_secret_value()
        if not entries:
            return {DEFAULT_ACCESS_KID: key, None: key}
        keys: dict[str | None, str] = dict(entries)
        if self._access_token_key_given():
            keys[None] = key
        return keys

    def _access_token_key_given(self) -> bool:
        return ("access_token_key" in self.model_fields_set
                and bool(self.access_token_key.get_secret_value()))

    def production_problems(self, variables: frozenset[str] | None = None) -> list[str]:
        """Why these secrets must not run in production, one phrase per variable (no
        value is ever named); empty when they may. ``variables``: only those (a command
        that uses only some secrets, cli/main.py); all of them by default."""
        problems: list[str] = []

        def check(variable: str, field: str | None, value: str, min_bytes: int) -> None:
            if variables is not None and variable.split(" ")[0] not in variables:
                return
            if field is not None and (field not in self.model_fields_set or not value):
                problems.append(f"{variable} is unset")
            elif value in DEV_SECRETS:
                problems.append(f"{variable} is a development value")
            elif len(value.encode("utf-8")) < min_bytes:
                problems.append(f"{variable} is shorter than {min_bytes} bytes")

        access_min = max((HMAC_MIN_BYTES[a] for a in self.access_token_algorithms
                          if a in HMAC_MIN_BYTES), default=0)  # public keys: no length
        entries = parse_access_token_keys(self.access_token_keys.get_secret_value())
        if entries:
            for kid, key in entries:
                check(f"BIZ_ACCESS_TOKEN_KEYS (kid {kid})", None, key, access_min)
            if self._access_token_key_given():  # still the key of tokens without a kid
                check("BIZ_ACCESS_TOKEN_KEY", "access_token_key",
                      self.access_token_key.get_secret_value(), access_min)
        else:
            check("BIZ_ACCESS_TOKEN_KEY", "access_token_key",
                  self.access_token_key.get_secret_value(), access_min)
        for variable, field, min_bytes in (
            ("BIZ_TRANSFER_TOKEN_SECRET", "transfer_token_secret", 32),
            ("BIZ_PIN_PEPPER", "pin_pepper", 32),
            ("BIZ_OTP_PEPPER", "otp_pepper", 32),
            ("BIZ_OPERATOR_SECRET", "operator_secret", 32),
        ):
            check(variable, field, getattr(self, field).get_secret_value(), min_bytes)
        return problems


#: The kid of BIZ_ACCESS_TOKEN_KEY when no key set is configured.
DEFAULT_ACCESS_KID = "default"


def parse_access_token_keys(text: str) -> list[tuple[str, str]]:
    """``[{"kid": ..., "key": ...}, ...]`` as (kid, key) pairs; empty text is no key set.
    Errors name the entry, never a key."""
    if not text.strip():
        return []
    try:
        raw = json.loads(text)
    except ValueError:
        raise ValueError("BIZ_ACCESS_TOKEN_KEYS is not JSON") from None
    if isinstance(raw, dict) and isinstance(raw.get("keys"), list):
        raw = raw["keys"]  # a JWKS-like {"keys": [...]} too
    if not isinstance(raw, list):
        raise ValueError("BIZ_ACCESS_TOKEN_KEYS must be a JSON list of {kid, key}")
    entries: list[tuple[str, str]] = []
    for n, item in enumerate(raw):
        kid = item.get("kid") if isinstance(item, dict) else None
        key = item.get("key") if isinstance(item, dict) else None
        if not isinstance(kid, str) or not 0 < len(kid) <= 128:
            raise ValueError(f"BIZ_ACCESS_TOKEN_KEYS[{n}]: kid must be 1 to 128 characters")
        if not isinstance(key, str) or not key:
            raise ValueError(f"BIZ_ACCESS_TOKEN_KEYS[{n}]: key must be a non-empty string")
        if any(kid == known for known, _ in entries):
            raise ValueError(f"BIZ_ACCESS_TOKEN_KEYS[{n}]: kid {kid!r} appears twice")
        entries.append((kid, key))
    return entries


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, then the env file, then the defaults."""
    return Settings(_env_file=default_env_file(), **overrides)
