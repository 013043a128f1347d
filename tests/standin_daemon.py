"""`diffusiond` on the stand-in generator, for lifecycle tests that need a real process (kill -9, signals).

    python -m tests.standin_daemon '{"hold": {"prompt": "slow one", "folder": "/tmp/gate"}}' run --config C

The first argument is a JSON object, the rest is diffusiond's own command line:
- `hold`: a `Gate` (`step`, default 1; `prompt`, default every job; `folder`): a held job writes
  `<folder>/held-<job_id>` and waits until `<folder>/release` exists or the daemon is stopped;
- `fail`: prompt -> message: a job with that prompt raises RuntimeError(message), an internal error;
- `step_s`: seconds each step takes;
- `kill`: prompts whose job kills the whole process with SIGKILL when its generation starts (a
  poison job that takes the daemon down, as a segfault in a native library would).

This module is the only way a `diffusiond run` process gets the stand-in: the daemon's own
command line and config have no way to ask for it (pipeline/standin.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusiond.daemon.cli import main
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.job import Job
from diffusiond.pipeline.standin import Gate, StandInGenerator


class KillingStandIn(StandInGenerator):
    """The stand-in, except that a job with one of `kill`'s prompts kills the process."""

    def __init__(self, kill: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill = set(kill)

    def generate(self, jobs: Sequence[Job], **kwargs: Any) -> list[Generated]:
        if any(job.spec.prompt in self.kill for job in jobs):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(jobs, **kwargs)


def generator_from(settings: dict[str, Any]) -> StandInGenerator:
    hold = settings.get("hold")
    gate = None
    if hold is not None:
        folder = Path(hold["folder"]) if hold.get("folder") else None
        gate = Gate(step=int(hold.get("step", 1)), prompt=hold.get("prompt"), folder=folder)
    fail = {prompt: RuntimeError(message) for prompt, message in settings.get("fail", {}).items()}
    step_s = float(settings.get("step_s", 0.0))
    if settings.get("kill"):
        return KillingStandIn(list(settings["kill"]), step_s=step_s, gate=gate, fail_with=fail)
    return StandInGenerator(step_s=step_s, gate=gate, fail_with=fail)


if __name__ == "__main__":
    generator = generator_from(json.loads(sys.argv[1]))
    sys.exit(main(sys.argv[2:], generator_factory=lambda _config: generator))
