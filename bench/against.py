"""Before/after: this checkout's daemon against another checkout's, on the overhead stream of run.py.

    git worktree add /tmp/diffusiond-before <commit>
    .venv/bin/python bench/against.py /tmp/diffusiond-before [--jobs 20] [--rounds 4]

Rounds alternate: N direct `generate()` calls in this process (model warm), then the same N jobs
dropped at once into each daemon (a real `diffusiond run` subprocess on its own temp spool), the
two daemons in turn and never at the same time. Each daemon's ratio is taken against the direct
calls of its own rounds; the CPU its threads used is read from /proc (threads named by the daemon
since the commit that named them; older daemons show as "python").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DAEMON, DaemonProc, cpu_by_thread_name, cpu_since, machine
from run import Direct


def import_root(checkout: Path, into: Path) -> Path:
    """A folder to put first on PYTHONPATH so `diffusiond` imports from `checkout` (its daemon/ and
    pipeline/ sit beside the package, mapped in by pyproject's package-dir)."""
    package = into / "diffusiond"
    package.mkdir(parents=True)
    for entry in (checkout / "diffusiond").iterdir():
        (package / entry.name).symlink_to(entry)
    for sub in ("daemon", "pipeline"):
        (package / sub).symlink_to(checkout / sub)
    return into


def start_daemons(
    checkouts: dict[str, Path | None], tmp: Path, models: Any, entry: list[str] = DAEMON
) -> dict[str, DaemonProc]:
    """A running daemon per side, each on its own spool under `tmp`, imported from its checkout
    (None: this one). `entry` is what follows `python` (bench/own_cpu.py passes its sleeping daemon)."""
    daemons: dict[str, DaemonProc] = {}
    cwd = Path.cwd()
    os.chdir(tmp)  # `python -m`/`-c` put the working directory first on sys.path: not a checkout's root
    try:
        for name, checkout in checkouts.items():
            if checkout is not None:
                os.environ["PYTHONPATH"] = str(import_root(checkout.resolve(), tmp / f"{name}-import"))
            try:
                daemons[name] = DaemonProc(tmp / f"spool-{name}", models, entry=entry)
            finally:
                os.environ.pop("PYTHONPATH", None)
    finally:
        os.chdir(cwd)
    return daemons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="another diffusiond checkout (e.g. a git worktree)")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-against-"))
    models = make_test_model(tmp / "models")
    print(f"machine: {machine()}")
    print(f"this checkout {Path(__file__).resolve().parent.parent} against {args.other.resolve()}")
    direct = Direct(models)
    sides = {"this": None, "other": args.other}
    daemons = start_daemons(sides, tmp, models)
    for daemon in daemons.values():
        daemon.run_one("warmup")
    totals = {name: [0.0, 0.0] for name in sides}  # daemon seconds, direct seconds of its rounds
    cpu: dict[str, Counter[str]] = {name: Counter() for name in sides}
    try:
        for r in range(args.rounds):
            for name, daemon in daemons.items():
                totals[name][1] += sum(direct.run(args.jobs))
                before = cpu_by_thread_name(daemon.proc.pid)
                seconds, _ = daemon.run_stream([f"r{r}{name}{i:04d}" for i in range(args.jobs)])
                totals[name][0] += seconds
                cpu[name].update(cpu_since(daemon.proc.pid, before))
    finally:
        for daemon in daemons.values():
            daemon.stop()
    jobs = args.jobs * args.rounds
    print(f"{args.rounds} rounds of {args.jobs} jobs per daemon (test model, 64x64, 4 steps)")
    print("| daemon | per job ms | direct per job ms | daemon / direct | CPU per job by thread, ms |")
    print("|---|---|---|---|---|")
    for name in sides:
        seconds, direct_s = totals[name]
        threads = ", ".join(f"{k} {v / jobs * 1e3:.1f}" for k, v in sorted(cpu[name].items(), key=lambda kv: -kv[1]))
        print(
            f"| {name} | {seconds / jobs * 1e3:.1f} | {direct_s / jobs * 1e3:.1f} | {seconds / direct_s:.3f} | "
            f"{threads} |"
        )
    this, other = (totals[n][0] / totals[n][1] for n in sides)
    print(f"this / other (each against its own direct rounds) = {this / other:.3f}")


if __name__ == "__main__":
    main()
