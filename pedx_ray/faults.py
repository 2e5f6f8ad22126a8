"""Test-only fault injection: one training worker dies once, so a test can watch the run recover.

Not a job setting and never set in production. A test sets ``PEDX_RAY_TEST_FAULT=EPOCH:MARKER`` in
the driver's environment before it starts a run; `pedx_ray.cluster.train_job_configs` passes the
variable on to the Ray Train workers, each worker reads it once, and rank 0 exits (``os._exit(1)``)
in its first training step after checkpoint EPOCH. It creates the file MARKER first, so the worker
Ray Train restarts from that checkpoint trains on, and the test can tell that the fault happened.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "PEDX_RAY_TEST_FAULT"


@dataclass(frozen=True)
class Fault:
    after_epoch: int  # checkpoint number: the worker dies in the epoch after it
    marker: Path

    @classmethod
    def from_env(cls) -> Fault | None:
        """The fault ``PEDX_RAY_TEST_FAULT`` asks for; None when it is unset (always, outside tests)."""
        value = os.environ.get(FAULT_ENV, "")
        if not value:
            return None
        epoch, _, marker = value.partition(":")
        if not epoch.isdigit() or int(epoch) < 1 or not marker:
            raise ValueError(
                f"{FAULT_ENV}={value!r}: expected EPOCH:MARKER with EPOCH >= 1, e.g. 1:/tmp/fault"
            )
        return cls(after_epoch=int(epoch), marker=Path(marker))

    def strike(self, epoch: int) -> None:
        """Exit the process during 0-based ``epoch`` when it follows checkpoint ``after_epoch``, once."""
        if epoch != self.after_epoch or self.marker.exists():
            return
        self.marker.touch()
        time.sleep(5)  # let the controller register the last checkpoint before the worker dies
        os._exit(1)


def worker_env_vars() -> dict[str, str]:
    """The fault setting for the Ray Train workers' environment: empty unless a test set it."""
    value = os.environ.get(FAULT_ENV)
    return {FAULT_ENV: value} if value else {}
