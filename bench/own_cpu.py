"""The daemon's own CPU per job, by thread, with generation replaced by a sleep.

    .venv/bin/python bench/own_cpu.py [--jobs 200] [--sleep-ms 60] [--daemon-from CHECKOUT]

On a machine where generation uses every core, each millisecond of the daemon's own work
(watching, pairing, claiming, validating, stamping, writing, archiving, reporting) is taken
from generation. This isolates that work: a real `diffusiond run` whose `generate()` sleeps
for `--sleep-ms` (four "steps", each reporting progress like the real one) and returns a
64 px image, fed the overhead section's stream (rounds of 20 jobs dropped at once). CPU per
job is read from /proc by OS thread name (diffusiond = main loop, worker, writer, watch).
Not a test double for the tests: the bench only, to measure what is left when generation
costs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from against import import_root
from common import DaemonProc, cpu_by_thread_name, cpu_since, machine

SLEEPING_DAEMON = """
import sys, time
from PIL import Image
import diffusiond.daemon.worker as worker
from diffusiond.daemon.cli import main
from diffusiond.pipeline.generate import Generated
from diffusiond.pipeline.job import seeds_for

SLEEP_S = float(sys.argv.pop(1))

def generate(cache, jobs, *, cancel=None, on_step=None):
    for step in range(1, 5):
        time.sleep(SLEEP_S / 4)
        if on_step is not None:
            on_step(step, 4)
    return [
        Generated([Image.new("RGB", (64, 64), (i * 7 % 256, 20, 30))], seeds_for(job.spec), "PNDMScheduler", 0.0,
                  SLEEP_S, model_hash="0" * 64, memory="normal", family="sd1", pipeline="StableDiffusionPipeline",
                  prediction="epsilon")
        for i, (job, _image) in enumerate(jobs)
    ]

worker.generate = generate
sys.exit(main(sys.argv[1:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="in rounds of 20 (default 200)")
    parser.add_argument("--sleep-ms", type=float, default=60.0, help="what a generate() call takes (default 60)")
    parser.add_argument(
        "--daemon-from", type=Path, help="run another checkout's daemon (unnamed threads show as 'python')"
    )
    args = parser.parse_args()
    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-own-cpu-"))
    models = make_test_model(tmp / "models")
    entry = ["-c", SLEEPING_DAEMON, str(args.sleep_ms / 1e3)]
    if args.daemon_from is not None:
        os.environ["PYTHONPATH"] = str(import_root(args.daemon_from.resolve(), tmp / "import"))
        os.chdir(tmp)  # not a checkout's root first on sys.path
    daemon = DaemonProc(tmp / "spool", models, entry=entry)
    rounds = max(1, args.jobs // 20)
    try:
        daemon.run_stream(["warm0", "warm1"])
        before = cpu_by_thread_name(daemon.proc.pid)
        seconds = sum(daemon.run_stream([f"r{r}j{i:02d}" for i in range(20)])[0] for r in range(rounds))
        spent = cpu_since(daemon.proc.pid, before)
    finally:
        daemon.stop()
    jobs = rounds * 20
    used = {name: seconds_used / jobs * 1e3 for name, seconds_used in spent.items()}
    print(f"machine: {machine()}")
    per_job = seconds / jobs * 1e3
    print(f"{jobs} jobs in rounds of 20, generate() = {args.sleep_ms:g} ms sleep; {per_job:.1f} ms per job")
    print("| thread | CPU ms per job |\n|---|---|")
    for name, ms in sorted(used.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} |")
    print(f"| all | {sum(used.values()):.2f} |")


if __name__ == "__main__":
    main()
