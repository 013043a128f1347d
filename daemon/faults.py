"""Named points where a test can make the daemon kill itself with SIGKILL, to prove crash recovery.

Armed only by the environment variable `DIFFUSIOND_FAULT`, which the crash tests set on
the daemon process they start; unset (always, in production) a point costs one dict lookup.

    DIFFUSIOND_FAULT=after_claim          kill at the first pass through `after_claim`
    DIFFUSIOND_FAULT=after_publish_image:3  kill at the third pass
    DIFFUSIOND_FAULT=random:0.05:SEED     kill at any point with probability 0.05 (seeded)

The points, in the order a job passes them, are `POINTS`; a name not in it is refused.
"""

from __future__ import annotations

import os
import random
import signal
import sys

POINTS = (
    "before_reserve_link",  # a claim id's reservation written in work/<instance>/, not linked into the outbox
    "after_reserve_link",  # the reservation in the outbox, its temporary not yet removed
    "after_claim",  # the job file is renamed into work/, jobs.json not written yet
    "after_validate",  # jobs.json written, nothing generated
    "after_keep_stage",  # a multi-stage job's stage kept in the claim folder, the next not run yet
    "after_stage_image",  # one image staged in the claim folder
    "before_manifest",  # every image staged, the staged manifest not yet
    "after_stage",  # the staged manifest written: the job is complete in work/
    "after_publish_image",  # one image linked into the outbox, the manifest not yet
    "after_manifest",  # the manifest published: the job is done
    "before_archive",  # every job done, the inputs still in work/
    "after_archive_input",  # one input moved to archive/ or failed/ (link made, or moved)
    "before_remove_claim",  # every input moved, the claim folder not yet removed
    "after_fence",  # a resumed claim's folder renamed, not yet counted
    "after_takeover",  # a lost daemon's claim renamed here and counted, not yet resumed
)
ENV = "DIFFUSIOND_FAULT"


class _Armed:
    def __init__(self, spec: str) -> None:
        self.name, self.remaining, self.rng, self.p = "", 1, None, 0.0
        if spec.startswith("random:"):
            _, p, seed = [*spec.split(":"), "0"][:3]
            self.p, self.rng = float(p), random.Random(int(seed) ^ os.getpid())
            return
        name, _, count = spec.partition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: no fault point {name!r}; the points are {', '.join(POINTS)}")
        self.name, self.remaining = name, int(count or 1)

    def hit(self, name: str) -> bool:
        if self.rng is not None:
            return self.rng.random() < self.p
        if name != self.name:
            return False
        self.remaining -= 1
        return self.remaining <= 0


_armed = _Armed(os.environ[ENV]) if os.environ.get(ENV) else None


def fault_point(name: str) -> None:
    """Die here with SIGKILL when the environment arms this point (see the module docstring)."""
    if _armed is not None and _armed.hit(name):
        sys.stderr.write(f"diffusiond: fault point {name}: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
