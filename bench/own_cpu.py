"""The daemon's own CPU per job, by thread, with generation replaced by a sleep.

    .venv/bin/python bench/own_cpu.py [--jobs 200] [--sleep-ms 60] [--against CHECKOUT [--rounds 4]]

On a machine where generation uses every core, each millisecond of the daemon's own work
(watching, pairing, claiming, validating, stamping, writing, archiving, reporting) is taken
from generation. This isolates that work: a real `diffusiond run` on the stand-in generator
(pipeline/standin.py), whose four steps sleep `--sleep-ms` in all and report progress like the
real ones, and which returns 64 px images, fed the overhead section's stream (rounds of 20 jobs
dropped at once). CPU per job is read from /proc by OS thread name (diffusiond = main loop,
worker, writer, watch): what is left when generation costs nothing.

`--against CHECKOUT` (a git worktree of an older commit, one with the stand-in) runs that
checkout's daemon beside this one's, both started at once and fed in turn, round by round: a
figure of one run on this machine varies by 10 % or more, a ratio of rounds taken in turn much less.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from against import start_daemons
from common import cpu_by_thread_name, cpu_since, machine

SLEEPING_DAEMON = """
import sys
from diffusiond.daemon.cli import main
from diffusiond.pipeline.standin import StandInGenerator

SLEEP_S = float(sys.argv.pop(1))
generator = StandInGenerator(step_s=SLEEP_S / 4)  # the stream's jobs have 4 steps, each reporting progress
sys.exit(main(sys.argv[1:], generator_factory=lambda _config: generator))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="per daemon, in rounds of 20 (default 200)")
    parser.add_argument("--sleep-ms", type=float, default=60.0, help="what a generate() call takes (default 60)")
    parser.add_argument("--against", type=Path, help="another checkout, whose daemon runs in turn with this one's")
    args = parser.parse_args()
    if args.against is not None and not (args.against / "pipeline" / "standin.py").is_file():
        parser.error(f"{args.against} has no stand-in generator (pipeline/standin.py): compare checkouts that have it")
    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-own-cpu-"))
    models = make_test_model(tmp / "models")
    entry = ["-c", SLEEPING_DAEMON, str(args.sleep_ms / 1e3)]
    sides = {"this": None} if args.against is None else {"this": None, "other": args.against}
    daemons = start_daemons(sides, tmp, models, entry)
    rounds = max(1, args.jobs // 20)
    spent = {name: Counter[str]() for name in sides}
    seconds = dict.fromkeys(sides, 0.0)
    try:
        for name, daemon in daemons.items():
            daemon.run_stream([f"{name}warm0", f"{name}warm1"])
        for r in range(rounds):
            for name, daemon in daemons.items():
                before = cpu_by_thread_name(daemon.proc.pid)
                seconds[name] += daemon.run_stream([f"{name}r{r}j{i:02d}" for i in range(20)])[0]
                spent[name].update(cpu_since(daemon.proc.pid, before))
    finally:
        for daemon in daemons.values():
            daemon.stop()
    jobs = rounds * 20
    print(f"machine: {machine()}")
    print(f"{jobs} jobs per daemon in rounds of 20, generate() = {args.sleep_ms:g} ms sleep")
    names = sorted({thread for used in spent.values() for thread in used}, key=lambda t: -spent["this"][t])
    print("| thread | " + " | ".join(f"{name}: CPU ms per job" for name in sides) + " |")
    print("|---|" + "---|" * len(sides))
    for thread in [*names, "all"]:
        row = [sum(spent[name].values()) if thread == "all" else spent[name][thread] for name in sides]
        print(f"| {thread} | " + " | ".join(f"{used / jobs * 1e3:.2f}" for used in row) + " |")
    print("| ms per job, drop to manifest | " + " | ".join(f"{seconds[n] / jobs * 1e3:.1f}" for n in sides) + " |")
    if args.against is not None:
        this, other = (sum(spent[name].values()) for name in sides)
        print(f"CPU per job, this / other ({args.against}): {this / other:.3f}")


if __name__ == "__main__":
    main()
