"""`diffusiond` on the stand-in generator, for lifecycle tests that need a real process (kill -9, signals).

    python -m tests.standin_daemon '{"hold": {"prompt": "slow one", "folder": "/tmp/gate"}}' run --config C

The first argument is a JSON object, the rest is diffusiond's own command line:
- `hold`: a `Gate` (`step`, default 1; `prompt`, default every job; `folder`): a held job writes
  `<folder>/held-<job_id>` and waits until `<folder>/release` exists or the daemon is stopped;
- `fail`: prompt -> message: a job with that prompt raises RuntimeError(message), an internal error;
- `step_s`: seconds each step takes.

This module is the only way a `diffusiond run` process gets the stand-in: the daemon's own
command line and config have no way to ask for it (pipeline/standin.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from diffusiond.daemon.cli import main
from diffusiond.pipeline.standin import Gate, StandInGenerator


def generator_from(settings: dict[str, Any]) -> StandInGenerator:
    hold = settings.get("hold")
    gate = None
    if hold is not None:
        folder = Path(hold["folder"]) if hold.get("folder") else None
        gate = Gate(step=int(hold.get("step", 1)), prompt=hold.get("prompt"), folder=folder)
    fail = {prompt: RuntimeError(message) for prompt, message in settings.get("fail", {}).items()}
    return StandInGenerator(step_s=float(settings.get("step_s", 0.0)), gate=gate, fail_with=fail)


if __name__ == "__main__":
    generator = generator_from(json.loads(sys.argv[1]))
    sys.exit(main(sys.argv[2:], generator_factory=lambda _config: generator))
