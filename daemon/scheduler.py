"""Which jobs run together: batches of compatible jobs, in arrival order. No torch, no image files here."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from diffusiond.daemon.claim import Claim
from diffusiond.daemon.stages import Chain
from diffusiond.pipeline.job import Job


@dataclass(frozen=True)
class Pending:
    """One job waiting to run, with the claim it belongs to (its input image is probed: `job.image`)."""

    claim: Claim
    job: Job
    chain: Chain | None = None
    """A multi-stage job's chain: `job` is its running stage (one image of it, after stage 1)."""
    part: int = 0
    """Which image of the chain's running stage `job` makes (0-based)."""


@dataclass
class Planned:
    key: Hashable
    items: list[Pending] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(p.job.spec.count for p in self.items)


def plan_batches(pending: Sequence[Pending], batch_size: int) -> list[list[Pending]]:
    """Group jobs with equal `batch_key` into calls of at most `batch_size` images.

    Order is kept within a key and batches start in the order of their first job, so
    a stream of different jobs runs first come, first served. A job whose `count`
    alone exceeds `batch_size` still runs, alone; so does a job of a claim that crashed the daemon.
    """
    batches: list[Planned] = []
    open_by_key: dict[Hashable, Planned] = {}
    for item in pending:
        # A claim that crashed the daemon before runs alone: a poison job's next crashes count
        # against it only, not against the jobs that happened to share its pipeline call.
        key = item.job.spec.batch_key(item.job.input_size) if not item.claim.crashes else None
        current = open_by_key.get(key) if key is not None else None
        # A stage's images stay in one call, as the images of one job do.
        same_stage = item.chain is not None and current is not None and current.items[-1].chain is item.chain
        if current is None or (current.images + item.job.spec.count > batch_size and not same_stage):
            current = Planned(key)
            batches.append(current)
            if key is not None:
                open_by_key[key] = current
        current.items.append(item)
    return [b.items for b in batches]
