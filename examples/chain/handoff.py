#!/usr/bin/env python3
"""An `on_done` hook: hand each image of a finished job to the next daemon, as an upscale job.

    hooks: {on_done: [python3, examples/chain/handoff.py, "{manifest}", /srv/spool-b]}

For each image in the manifest it writes, in a temporary folder, a job for the next step (here a
Lanczos 2x upscale that carries the original prompt, so the final image's metadata still says
what it shows) with a copy of the image, and submits both with `diffusiond submit --spool`: the
image first, the job file last, each renamed into the inbox whole. The first daemon's outbox is
left as it is. Only the standard library and the `diffusiond` command; exit 1 if a submit fails
(the daemon logs it and counts it in `hooks_failed`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(manifest_path: str, next_spool: str) -> int:
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    outbox = Path(manifest_path).parent
    failures = 0
    for output in manifest["outputs"]:
        image = outbox / output["file"]
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(image, Path(folder) / image.name)
            job = Path(folder) / f"{image.stem}.yaml"
            job.write_text(
                "task: upscale\nmethod: lanczos\nscale: 2\n"
                f"image: {image.name}\nprompt: {json.dumps(manifest['job']['prompt'])}\n",
                encoding="utf-8",
            )
            result = subprocess.run([_diffusiond(), "submit", str(job), "--spool", next_spool], check=False)
            failures += result.returncode != 0
        print(f"handed {image.name} (seed {output['seed']}) to {next_spool}")
    return 1 if failures else 0


def _diffusiond() -> str:
    """The `diffusiond` beside this Python (a venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("diffusiond")
    return str(beside) if beside.exists() else "diffusiond"


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
