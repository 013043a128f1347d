"""What a user checks on a spool after any crash: every input in one place, every job's outputs once.

The spool invariants the crash, race and full-disk tests assert (README, Guarantees).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Spool

WORK_FILES = {"claim.json", "jobs.json", "trail.log"}


def where_inputs_are(spool: Spool, names: list[str]) -> dict[str, list[Path]]:
    """Each input name -> every place a file of that name is (inbox, archive/, failed/, work/)."""
    places: dict[str, list[Path]] = {name: [] for name in names}
    for folder in ("inbox", "archive", "failed", "work"):
        root = spool.folder(folder)
        for path in root.rglob("*") if root.is_dir() else []:
            if path.name in places and not path.is_dir():
                places[path.name].append(path)
    return places


def check_spool(
    spool: Spool, dropped: dict[str, bytes], *, jobs: int, failed: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Assert the invariants after the daemon has finished everything; returns the manifests."""
    # Every input in exactly one place, whole: archive/ for done, failed/ (with a report) for failed.
    places = where_inputs_are(spool, list(dropped))
    for name, data in dropped.items():
        assert len(places[name]) == 1, f"{name} is in {len(places[name])} places: {places[name]}"
        [path] = places[name]
        expected = "failed" if name in failed else "archive"
        assert path.parent == spool.folder(expected), f"{name} ended in {path.parent}, not {expected}/"
        assert path.read_bytes() == data, f"{name} changed on its way"
    reports = [yaml.safe_load(p.read_text()) for p in spool.failed.glob("*.error.yaml")]
    assert sorted(r["file"] for r in reports) == sorted(n for n in failed if n.endswith((".yaml", ".yml"))), reports
    # Every job's outputs visible once: one manifest per job, each output there with its sha256.
    manifests = [json.loads(p.read_text()) for p in sorted(spool.outbox.glob("*.json"))]
    ids = Counter(m["job_id"] for m in manifests)
    assert all(n == 1 for n in ids.values()), ids
    assert len(manifests) == jobs, f"{len(manifests)} manifests for {jobs} jobs"
    listed = set()
    for manifest in manifests:
        listed.add(f"{manifest['job_id']}.json")
        for output in manifest["outputs"]:
            data = (spool.outbox / output["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == output["sha256"], output["file"]
            listed.add(output["file"])
    outbox = {p.name for p in spool.outbox.iterdir()}
    assert outbox == listed, f"not in a manifest: {sorted(outbox - listed)}; missing: {sorted(listed - outbox)}"
    # No temp file, reservation or claim left.
    for folder in ("inbox", "archive", "failed", "outbox"):
        hidden = [p.name for p in spool.folder(folder).rglob(".*")] if spool.folder(folder).is_dir() else []
        assert hidden == [], f"left in {folder}/: {hidden}"
    work = spool.root / "work"
    claims = [p for p in work.rglob("*") if p.is_dir() and p.parent.parent == work] if work.is_dir() else []
    assert claims == [], f"claims left in work/: {claims}"
    return manifests


def events(state: Path) -> list[dict[str, Any]]:
    path = state / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_status(spool: Spool, manifests: list[dict[str, Any]]) -> None:
    """status.json and events.jsonl agree with the files: nothing running, no job done twice or unpublished."""
    state = spool.root / "state"
    status = json.loads((state / "status.json").read_text())
    assert status["state"] == "stopped" and status["running"] == [], status
    done = Counter(e["job_id"] for e in events(state) if e["event"] == "done")
    published = {m["job_id"] for m in manifests}
    assert set(done) <= published, f"done events without a manifest: {set(done) - published}"
    assert all(n == 1 for n in done.values()), f"a job reported done twice: {done}"
