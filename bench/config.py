"""The knobs of one benchmark run, with defaults sized for a 2-core machine that also runs
the broker, the database and the load generator."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).absolute().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"

#: The currency of every seeded account.
CURRENCY = "USD"
#: The PIN of every seeded user.
PIN = "135790"
#: Amounts strictly above this need an OTP (the users' ``otp_threshold_minor``).
OTP_THRESHOLD_MINOR = 100_000
#: Amounts of transfers without an OTP: uniform in [MIN, threshold]; with an OTP: uniform in
#: (threshold, 2 * threshold]. So the share of OTP transfers is exactly the drawn share.
MIN_AMOUNT_MINOR = 100
#: Opening balance of every account: large enough that no transfer is refused for funds.
INITIAL_BALANCE_MINOR = 10**12
#: Daily limit of every user: never reached in a run.
DAILY_LIMIT_MINOR = 10**15


@dataclass(frozen=True)
class BenchConfig:
    duration: float = 60.0
    warmup: float = 10.0
    users: int = 32
    accounts: int = 1000
    otp_share: float = 0.10
    partitions: int = 6
    workers: int = 1
    seed: int = 1
    output_dir: Path = RESULTS_DIR
    skip_echo: bool = False
    echo_duration: float = 20.0
    echo_warmup: float = 3.0
    profile: bool = False
    profile_rate: int = 97
    trace: bool = False
    experiments: tuple[str, ...] = ()
    table_store: str = "rocksdb://"
    event_loop: str = "uvloop"
    request_timeout: float = 30.0
    drain_timeout: float = 60.0
    idle_seconds: float = 5.0
    quiesce_timeout: float = 90.0
    start_timeout: float = 120.0
    log_level: str = "INFO"
    keep: bool = False
    append_doc: bool = True
    label: str = ""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data
