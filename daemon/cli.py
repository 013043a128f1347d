"""`diffusiond` subcommands: run, reload, status, events, submit, cancel, retry, validate, schema, inspect, init,
make-test-model, cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from diffusiond import __version__
from diffusiond.daemon import registry
from diffusiond.daemon.config import Config, load_config
from diffusiond.daemon.fsutil import atomic_write
from diffusiond.daemon.journal import setup_logging
from diffusiond.daemon.pairing import resolve_inputs
from diffusiond.daemon.status import EventTail
from diffusiond.pipeline.errors import DiffusiondError
from diffusiond.pipeline.job import IMAGE_SUFFIXES, Rules, Spec, UpscaleJob, read_job_file

if TYPE_CHECKING:
    from diffusiond.daemon.service import GeneratorFactory

log = logging.getLogger("diffusiond")

EXIT_CONFIG = 78
"""`run` refused to start: the config, or this machine for it (sysexits' EX_CONFIG). The units name it in
`RestartPreventExitStatus=`: starting again unchanged fails again, so systemd does not loop."""

INIT_CONFIG = """\
# diffusiond config: every field is optional (see README.md, "The config").
spool: .                      # inbox/ outbox/ archive/ failed/ work/ live here
device: auto                  # auto | cpu | cuda | cuda:N | mps
dtype: auto                   # auto = fp32 on CPU, fp16 on GPU
models:
  # sd15: /models/stable-diffusion-v1-5          # a diffusers folder
  test: {test_model}/sd                         # `diffusiond make-test-model` (noise only)
  test-x4: {test_model}/x4-upscaler
defaults:
  all: {{model: test, steps: 10, size: 64x64}}
  upscale: {{model: test-x4}}
profiles:
  sketches: {{task: img2img, prompt: a watercolor painting, strength: 0.7}}
watch: {{mode: auto, settle_s: 1.0, pair_wait_s: 5.0}}
"""


def main(argv: list[str] | None = None, *, generator_factory: GeneratorFactory | None = None) -> int:
    """The command line. `generator_factory` is for code that runs `diffusiond run` with another
    generator (tests/standin_daemon.py, bench/own_cpu.py); the command line itself cannot pick one."""
    parser = argparse.ArgumentParser(prog="diffusiond", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffusiond {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="watch the inbox and run jobs until stopped")
    _config_args(run)
    run.add_argument("--oneshot", action="store_true", help="run what is in the inbox now, then exit")
    run.add_argument("--device", help="override the config's device (e.g. cuda:1, for one instance per GPU)")
    run.add_argument("--instance", help="override the config's instance name (names work/<instance>/)")
    run.add_argument("--state-dir", type=Path, help="override the config's state_dir")
    run.add_argument(
        "--take-over",
        action="store_true",
        help="take the work folder even from a live daemon of the same instance, which then steps down "
        "(a restarted cluster slot; see README, Several hosts)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    submit = commands.add_parser("submit", help="drop a job file (and its images) into the inbox atomically")
    _config_args(submit)
    submit.add_argument("job", type=Path)
    submit.add_argument("--wait", action="store_true", help="wait for the results and print their paths")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    submit.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout (paths, status)")

    validate = commands.add_parser("validate", help="check job files against the config without running them")
    _config_args(validate)
    validate.add_argument("jobs", type=Path, nargs="+")

    commands.add_parser("schema", help="print the JSON Schema of a job file's jobs (for editors: README, A job file)")

    init = commands.add_parser("init", help="create the spool folders and a starter config")
    init.add_argument("directory", type=Path)

    make = commands.add_parser("make-test-model", help="write tiny random-weight test models (images are noise)")
    make.add_argument("directory", type=Path)

    inspect_cmd = commands.add_parser(
        "inspect",
        help="print an image's metadata and invisible watermark; exit 0 only if every file has our watermark",
    )
    inspect_cmd.add_argument("files", type=Path, nargs="+", metavar="FILE")
    inspect_cmd.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    inspect_cmd.add_argument(
        "--credentials",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="an outbox (or any folder of diffusiond manifests) where a tiled mark's id is looked up; "
        "default: the config's outbox, where a config is found",
    )
    inspect_cmd.add_argument(
        "--payload",
        action="append",
        default=[],
        metavar="TEXT",
        help="a watermark payload to check keyed marks against (default: 'diffusiond' and the config's)",
    )
    inspect_cmd.add_argument("--config", type=Path, help="config file (default: ./config.yaml, else /etc/diffusiond)")

    status = commands.add_parser(
        "status", help="what the daemon is doing; exit 0 running, 1 not running (or gone), 2 no status file"
    )
    _state_args(status)
    status.add_argument("--json", action="store_true", help="print status.json as it is")
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="show it again every SECONDS (default 1), in place on a terminal, until Ctrl-C",
    )

    events = commands.add_parser(
        "events", help="the event stream: claimed, started, progress, done, failed, ... (from its state dir)"
    )
    _state_args(events)
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events until interrupted")
    events.add_argument("--json", action="store_true", help="one JSON object a line, as written")
    events.add_argument("--job", metavar="ID", help="only this job's (or claim's) events")

    cancel_cmd = commands.add_parser(
        "cancel",
        help="cancel a job (running, waiting, or still in the inbox): its inputs go to failed/, code cancelled",
    )
    _config_args(cancel_cmd)
    cancel_cmd.add_argument("target", metavar="JOB_ID|FILE", help="a claim or job id, or a file in the inbox")
    cancel_cmd.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it to end (300)")
    cancel_cmd.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")

    retry_cmd = commands.add_parser(
        "retry", help="move failed inputs back into the inbox (after fixing the job file), removing their reports"
    )
    _config_args(retry_cmd)
    retry_cmd.add_argument("files", nargs="*", metavar="FILE", help="a failed input or its report (in failed/)")
    retry_cmd.add_argument("--all", action="store_true", help="every failure in failed/ (with --code: those)")
    retry_cmd.add_argument("--code", help="only failures with this code (e.g. model_failed, cancelled)")

    web = commands.add_parser(
        "web", help="the status page (queue, progress, results, failures, /metrics): reads the spool, binds loopback"
    )
    _config_args(web)
    web.add_argument("--listen", default="127.0.0.1:8765", metavar="HOST:PORT", help="default 127.0.0.1:8765")
    web.add_argument("--token-file", type=Path, help="a file holding the token that the cancel and retry buttons need")
    web.add_argument("--cache", type=Path, help="where thumbnails go (default $XDG_CACHE_HOME/diffusiond/thumbs)")

    cluster = commands.add_parser(
        "cluster",
        help="serve the spool from slots on a Ray cluster (the `cluster` extra; README, Several hosts)",
        description="Without an action: the driver, which keeps one slot per GPU of the Ray cluster until stopped.",
    )
    _config_args(cluster)
    cluster.add_argument("--address", help="the Ray cluster (default: the config's cluster.address, `auto`)")
    cluster.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    actions = cluster.add_subparsers(dest="action")
    actions.add_parser("status", help="every slot (host, state, job, step, queue) and the inbox backlog")
    drain = actions.add_parser("drain", help="stop a slot warm (its queued claims back to the inbox) and remove it")
    drain.add_argument("slot", help="the slot's name, e.g. gpu-01")
    drain.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for its running job")
    undrain = actions.add_parser("undrain", help="let the driver place a drained slot again")
    undrain.add_argument("slot")

    reload = commands.add_parser(
        "reload", help="make the running daemon read its config again, and wait until it has (the units' ExecReload)"
    )
    _state_args(reload)
    reload.add_argument("--pid", type=int, help="the daemon's pid (systemd's $MAINPID); default: status.json's")
    reload.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")

    args = parser.parse_args(argv)
    try:
        code = {
            "run": lambda args: _run(args, generator_factory),
            "submit": _submit,
            "validate": _validate,
            "init": _init,
            "make-test-model": _make_test_model,
            "inspect": _inspect,
            "status": _status,
            "reload": _reload,
            "schema": _schema,
            "events": _events,
            "cancel": _cancel,
            "retry": _retry,
            "web": _web,
            "cluster": _cluster,
        }[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except DiffusiondError as exc:
        print(f"diffusiond: {exc}", file=sys.stderr)
        return EXIT_CONFIG if args.command == "run" else 2
    except BrokenPipeError:  # `diffusiond status | head`: the reader has what it wanted
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again on the closed pipe."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (default: ./config.yaml, else /etc/diffusiond/config.yaml, if present)",
    )
    parser.add_argument("--spool", type=Path, help="spool folder (overrides the config's `spool:`)")


def _state_args(parser: argparse.ArgumentParser) -> None:
    """How a command that reads a running daemon's state dir finds it (`_state_dir`)."""
    _config_args(parser)
    parser.add_argument("--state-dir", type=Path, help="the state_dir the daemon was run with (`run --state-dir`)")
    parser.add_argument("--instance", help="the instance the daemon was run with (`run --instance`)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, spool=args.spool)


def _run(args: argparse.Namespace, generator_factory: GeneratorFactory | None) -> int:
    setup_logging(args.log_level)  # the journal under systemd (with job fields), stderr otherwise
    overrides = {
        "device": args.device,
        "instance": args.instance,
        "state_dir": str(args.state_dir.absolute()) if args.state_dir else None,
    }

    def load() -> Config:
        return load_config(args.config, spool=args.spool, overrides=overrides)

    config = load()
    log.info(
        "diffusiond %s: config %s, spool %s, state %s",
        __version__,
        config.source or "none (the built-in defaults; --config FILE to name one)",
        config.spool,
        config.state,
    )
    from diffusiond.daemon.service import Daemon, diffusers_generator

    daemon = Daemon(
        config,
        oneshot=args.oneshot,
        reload_config=load,
        generator_factory=generator_factory or diffusers_generator,
        take_over=args.take_over,
    )
    try:
        return daemon.run()
    except DiffusiondError as exc:
        if exc.field == "device" and args.device:  # the config's `device:` is not what to fix
            exc.message += f" (`--device {args.device}` on the command line)"
            exc.fix = (
                "diffusiond@N.service passes --device cuda:0 and sees GPU N only: where there is no such GPU, run "
                "diffusiond.service instead, or give the instance another ExecStart (`systemctl edit diffusiond@`); "
                f"elsewhere: {exc.fix}"
            )
        raise


def _cluster(args: argparse.Namespace) -> int:
    """The driver (no action), or one of its actions on the running slots."""
    try:
        from diffusiond.daemon import cluster
    except ImportError as exc:
        print(f"diffusiond: `cluster` needs Ray ({exc}): pip install 'diffusiond[cluster]'", file=sys.stderr)
        return 2
    driver = cluster.Driver(args.config, spool=args.spool)
    if args.action is None:
        setup_logging(args.log_level)
        import signal
        import threading

        stop = threading.Event()
        driver.connect(args.address)
        # After connecting: ray.init sets a SIGTERM handler of its own that exits with status 15, which
        # systemd counts as a failure (found under a real systemd: `systemctl stop` left Result=exit-code).
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        log.info(
            "driver: keeping the slots of %s on the Ray cluster (every %g s)",
            driver.config.spool,
            driver.config.cluster.reconcile_s,
        )
        driver.serve(stop)
        log.info("driver stopped; the slots run on (`diffusiond cluster drain SLOT` stops one)")
        return 0
    driver.connect(args.address)
    if args.action == "status":
        print(cluster.format_views(driver.views(), driver.backlog()))
        return 0
    if args.action == "undrain":
        print(f"{args.slot}: " + ("the driver places it again" if driver.undrain(args.slot) else "was not drained"))
        return 0
    try:
        last = driver.drain(args.slot, timeout_s=args.timeout)
    except ValueError:
        print(f"diffusiond: no slot {args.slot!r} (see `diffusiond cluster status`)", file=sys.stderr)
        return 1
    counts = (last.get("daemon") or {}).get("counters") or {}
    print(f"{args.slot} drained on {last.get('host')}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _validate(args: argparse.Namespace) -> int:
    config = _load(args)
    failures = 0
    for path in args.jobs:
        try:
            specs = _read_job(path, config)
        except DiffusiondError as exc:
            print(f"INVALID {exc}")
            failures += 1
            continue
        print(f"{path}: ok, {len(specs)} job(s)")
        for index, spec in enumerate(specs, start=1):
            how = f"method={spec.method}" if isinstance(spec, UpscaleJob) else f"model={spec.model}"
            print(f"  {index}. {spec.task} {how} steps={spec.steps} count={spec.count} seed={spec.seed}")
            for field_name, image in resolve_inputs(spec, path.name, _beside(path)).items():
                if image is None or not (path.parent / image).is_file():
                    written = spec.named_inputs().get(field_name) or "same-stem image"
                    print(f"     note: its {field_name} ({written}) is not next to the job file")
    return 1 if failures else 0


def _beside(job_path: Path) -> Callable[[str], bool]:
    """Whether an image named relative to a job file outside the inbox is there."""
    return lambda relative: (job_path.parent / relative).is_file()


def _read_job(path: Path, config: Config, rules: Rules | None = None) -> list[Spec]:
    """A job file outside the inbox, read as if dropped in the inbox root (image paths are relative to it).

    A link the user names is followed (only the inbox refuses links).
    """
    try:
        return read_job_file(path.resolve(), label=path.name, rules=rules or config.rules())
    except DiffusiondError as exc:
        exc.path = str(path)  # the user named it by this path, not by its name in an inbox
        raise


EXIT_NO_DAEMON = 4
"""`submit --wait`: no daemon runs on the spool (from its registry, at once: not after the timeout)."""


def _submit(args: argparse.Namespace) -> int:
    """Exit 0 done (dropped, without --wait), 1 failed, 2 usage or a wrong job, 3 timed out, 4 no daemon."""
    config = _load(args)
    live = registry.live_daemons(config.spool)
    job_path: Path = args.job
    specs = _read_job(job_path, config, _submit_rules(config, live))
    inbox = config.inbox
    if args.wait and not live:
        return _answer(args, EXIT_NO_DAEMON, {"status": "no_daemon"}, _no_daemon(config) + "; nothing submitted")
    stem = job_path.stem
    if args.wait or any((inbox / f"{stem}{s}").exists() for s in (".yaml", ".yml", *IMAGE_SUFFIXES)):
        stem = f"{stem}-{secrets.token_hex(3)}"  # a name of our own, so --wait finds our results only
    # Images first, job file last: the daemon then finds the job complete.
    for spec in specs:
        needs = resolve_inputs(spec, job_path.name, _beside(job_path))
        same_stem = "image" in needs and "image" not in spec.named_inputs()
        for field_name, image in needs.items():
            if image is None:
                continue
            source = job_path.parent / image
            # The same-stem sketch follows the job file's new stem, and so does the mask found beside
            # it; the files the job names keep their names (a mask beside a named image: its image's).
            target = inbox / image
            if same_stem and (field_name == "image" or (field_name == "mask" and "mask" not in spec.named_inputs())):
                target = inbox / (stem + image[len(job_path.stem) :])
            if target.exists() and target.read_bytes() != source.read_bytes():
                print(f"diffusiond: {target} already exists with other content; rename {image}", file=sys.stderr)
                return 2
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, source.read_bytes())
    dropped = inbox / f"{stem}{job_path.suffix}"
    atomic_write(dropped, job_path.read_bytes())
    print(f"submitted {dropped}", file=sys.stderr if args.json else sys.stdout)
    if not live:
        print(f"diffusiond: note: {_no_daemon(config)}: the job waits in the inbox", file=sys.stderr)
    if not args.wait:
        return _answer(args, 0, {"status": "submitted", "job_file": str(dropped)})
    return _wait(args, config, dropped.name, len(specs), live)


def _submit_rules(config: Config, live: list[dict[str, Any]]) -> Rules:
    """The config's rules when it names models; else a running daemon's (from the spool); else no model checks."""
    if config.models or not live:
        rules = config.rules()
        return rules if config.models else dataclasses.replace(rules, check_models=False)
    return registry.rules_of(live[0])


def _no_daemon(config: Config) -> str:
    return f"no daemon is running on {config.spool} (none announced in {config.spool / registry.FOLDER})"


def _wait(args: argparse.Namespace, config: Config, name: str, jobs: int, live: list[dict[str, Any]]) -> int:
    """Wait for all manifests of the dropped file, or its error report; progress on stderr from the events."""
    stem = Path(name).stem
    deadline = time.monotonic() + args.timeout
    events = EventTail([Path(str(entry["state_dir"])) for entry in live if entry.get("state_dir")])
    progress = _Progress(name)
    next_check = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for event in events.new():
            progress.see(event)
        records = [m for m in _read_all(config.outbox.glob(f"{stem}-*.json"), json.loads) if m.get("source") == name]
        manifests = sorted((m for m in records if m.get("status") != "failed"), key=lambda m: m.get("index", 0))
        reports = [
            r
            for r in _read_all(config.folder("failed").glob(f"{stem}*.error.yaml"), yaml.safe_load)
            if name in r.get("inputs", [])
        ]
        if reports or len(manifests) >= jobs:
            progress.end()
            result = _result(config, manifests)
            if not reports:
                return _answer(args, 0, {"status": "done", "source": name, **result}, lines=result["files"])
            report = reports[0]
            failure = {k: report.get(k) for k in ("code", "error", "field", "fix")}
            report_path = str(config.folder("failed") / f"{Path(report['inputs'][0]).stem}.error.yaml")
            message = f"failed: {report.get('error')}\nfix: {report.get('fix', '')}"
            body = {"status": "failed", "source": name, **failure, "report": report_path, **result}
            return _answer(args, 1, body, message, lines=result["files"])
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 1.0
            if not registry.live_daemons(config.spool):
                progress.end()
                return _answer(args, EXIT_NO_DAEMON, {"status": "no_daemon", "source": name}, _no_daemon(config))
        time.sleep(0.1)
    progress.end()
    message = f"no result for {name} after {args.timeout:g} s (is the daemon running?)"
    return _answer(args, 3, {"status": "timeout", "source": name}, message)


def _result(config: Config, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The jobs' paths: `manifests`, `outputs`, and `files` (each job's images, then its manifest) to print."""
    outputs: list[str] = []
    paths: list[str] = []
    files: list[str] = []
    for manifest in manifests:
        images = [str(config.outbox / output["file"]) for output in manifest.get("outputs", [])]
        outputs += images
        paths.append(str(config.outbox / f"{manifest['job_id']}.json"))
        files += [*images, paths[-1]]
    return {"manifests": paths, "outputs": outputs, "files": files}


def _answer(
    args: argparse.Namespace, code: int, body: dict[str, Any], message: str = "", lines: list[str] | None = None
) -> int:
    """The end of `submit`: JSON on stdout with --json, else the paths on stdout; why, on stderr."""
    if args.json:
        print(json.dumps({k: v for k, v in body.items() if k != "files"}, indent=1, ensure_ascii=False))
    else:
        for line in lines or []:
            print(line)
    if message:
        print(f"diffusiond: {message}" if not message.startswith("failed:") else message, file=sys.stderr)
    return code


class _Progress:
    """`submit --wait`'s progress on stderr: a bar on a terminal, `step k/n` lines otherwise."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.claims: set[str] = set()
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def see(self, event: dict[str, Any]) -> None:
        if event.get("event") == "claimed" and event.get("source") == self.source:
            self.claims.add(str(event.get("claim_id")))
        if event.get("event") != "progress" or event.get("claim_id") not in self.claims:
            return
        step, steps, job = int(event.get("step", 0)), max(int(event.get("steps", 1)), 1), event.get("job_id")
        stage = f"stage {event['stage']}/{event.get('stages')} " if event.get("stage") else ""
        if self.tty:
            filled = round(30 * step / steps)
            sys.stderr.write(f"\r{job} {stage}[{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            sys.stderr.flush()
            self.drawn = True
        else:
            print(f"{stage}step {step}/{steps} {job}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def _read_all(paths: Any, parse: Any) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        try:
            out.append(parse(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, yaml.YAMLError):
            continue
    return [item for item in out if isinstance(item, dict)]


def _init(args: argparse.Namespace) -> int:
    root: Path = args.directory
    for name in ("inbox", "inbox/sketches", "outbox", "archive", "failed", "work", "models"):
        (root / name).mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    if config.exists():
        print(f"{config} exists; left as it is")
    else:
        config.write_text(INIT_CONFIG.format(test_model="models/test"), encoding="utf-8")
        print(f"wrote {config}")
    print(f"next: diffusiond make-test-model {root / 'models/test'} && diffusiond run --config {config}")
    return 0


def _make_test_model(args: argparse.Namespace) -> int:
    """Every tiny family the tests use, each in its own folder, and the config lines that name them."""
    from diffusiond.pipeline.testmodel import (  # imports torch
        make_family_models,
        make_test_controlnet,
        make_test_embedding,
        make_test_inpaint,
        make_test_lora,
        make_test_model,
        make_test_sdxl_inpaint,
    )

    paths = make_test_model(args.directory)
    families = make_family_models(args.directory)
    inpaint, sdxl_inpaint = make_test_inpaint(args.directory), make_test_sdxl_inpaint(args.directory)
    controlnets = Path(args.directory) / "controlnets"
    make_test_controlnet(paths.sd, controlnets / "scribble")
    make_test_controlnet(families.sdxl, controlnets / "sdxl-scribble")
    lora = Path(args.directory) / "loras" / "test-lora.safetensors"
    if not lora.exists():
        make_test_lora(paths.sd, lora)
    embedding = Path(args.directory) / "embeddings" / "test-style.pt"
    if not embedding.exists():
        make_test_embedding(paths.sd, embedding)
    print("test models (random weights: their images are noise); for a config:\nmodels:")
    for name, path in (
        ("test", paths.sd),
        ("test-x4", paths.upscaler),
        ("test-sd2-v", families.sd2_v),
        ("test-sdxl", families.sdxl),
        ("test-depth", families.depth2img),
        ("test-refiner", families.sdxl_refiner),
        ("test-inpaint", inpaint),
        ("test-sdxl-inpaint", sdxl_inpaint),
    ):
        print(f"  {name}: {path}")
    print(f"loras: {lora.parent}                 # <lora:test-lora:0.8> (for the model test)")
    print(f"embeddings: {embedding.parent}       # test-style in a prompt (for the model test)")
    print(f"controlnets: {controlnets}     # control: {{model: scribble}} (test), sdxl-scribble (test-sdxl)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Exit 0: a diffusiond watermark in every file; 1: not in some; 2: a file could not be read."""
    from diffusiond.pipeline.inspect import UnreadableImage, format_report, inspect_image, watermark_found

    payloads, folders = _inspect_sources(args)
    reports: list[dict[str, Any]] = []
    unreadable = False
    for path in args.files:
        try:
            report = inspect_image(path, payloads=payloads, credentials=folders)
        except UnreadableImage as exc:
            unreadable = True
            reports.append({"file": str(path), "error": str(exc)})
            if not args.json:
                print(f"diffusiond: {exc}", file=sys.stderr)
            continue
        reports.append(report)
        if not args.json:
            print(format_report(report))
    if args.json:
        print(json.dumps(reports, indent=1, ensure_ascii=False))
    if unreadable:
        return 2
    return 0 if all(watermark_found(report) for report in reports) else 1


def _inspect_sources(args: argparse.Namespace) -> tuple[list[str], list[Path]]:
    """The payloads keyed marks are checked against, and the folders a mark id is looked up in:
    the options', then the config's (its invisible text, its outbox) where a config is found."""
    from diffusiond.daemon.config import config_file

    payloads = ["diffusiond"]
    for payload in args.payload:
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
            print(f"diffusiond: --payload {payload!r} is not UTF-8 text; left out", file=sys.stderr)
        else:
            payloads.append(payload)
    folders = list(args.credentials)
    if args.config or config_file(None) is not None:
        try:
            config = load_config(args.config)
        except (DiffusiondError, ValueError, OSError) as exc:  # ValueError: a config that is not UTF-8
            print(f"diffusiond: the config is not used for inspect: {exc}", file=sys.stderr)
        else:
            if config.watermark.invisible is not None:
                payloads.append(config.watermark.invisible.text)
            if config.outbox.is_dir():
                folders.append(config.outbox)
    return list(dict.fromkeys(payloads)), list(dict.fromkeys(folder.resolve() for folder in folders))


def _status(args: argparse.Namespace) -> int:
    """Exit 0: the daemon runs; 1: it stopped, or its pid is gone; 2: no status file for this config."""
    if args.watch is None:
        code, text = _status_text(args)
        print(text, file=sys.stdout if code < 2 else sys.stderr)
        return code
    return _watch_status(args)


def _status_text(args: argparse.Namespace) -> tuple[int, str]:
    from diffusiond.daemon.status import STATUS_FILE, format_status, is_running

    path = _state_dir(args) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
        status = json.loads(text)
    except FileNotFoundError:
        return 2, f"diffusiond: no status at {path}; is the daemon running with this config (or --spool)?"
    except (OSError, ValueError) as exc:
        return 2, f"diffusiond: cannot read {path}: {exc}"
    running = is_running(status)
    return (0 if running else 1), (text.rstrip("\n") if args.json else format_status(status, running=running))


def _watch_status(args: argparse.Namespace) -> int:
    """`status --watch`: redraw in place on a terminal (each change once, elsewhere) until interrupted."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tty = sys.stdout.isatty()
    shown = None
    try:
        while True:
            _code, text = _status_text(args)
            if text != shown:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: what `watch` does
                elif shown is not None:
                    sys.stdout.write("\n")
                print(text, flush=True)
                shown = text
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _events(args: argparse.Namespace) -> int:
    """Print events; with --follow until interrupted (Ctrl-C, SIGTERM, a closed pipe): exit 0."""
    import signal

    from diffusiond.daemon.status import EVENTS_FILE, event_matches, format_event, read_events

    state = _state_dir(args)
    if not args.follow and not (state / EVENTS_FILE).exists():
        print(
            f"diffusiond: no events at {state / EVENTS_FILE}; is the daemon running with this config?", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a tool stopping it: the same quiet exit
    try:
        for event in read_events(state, follow=args.follow):
            if args.job and not event_matches(event, args.job):
                continue
            print(json.dumps(event, ensure_ascii=False) if args.json else format_event(event), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        sys.stderr.close()  # no traceback, and none for the closed pipe at exit
    return 0


def _cancel(args: argparse.Namespace) -> int:
    """Exit 0 cancelled (or it ended first: said so), 1 nothing by that name, 3 still ending at the
    timeout, 4 no daemon."""
    from diffusiond.daemon import cancel

    config = _load(args)
    if not registry.live_daemons(config.spool):
        print(f"diffusiond: {_no_daemon(config)}; nothing cancelled", file=sys.stderr)
        return EXIT_NO_DAEMON
    target = _inbox_relative(args.target, config)
    request = cancel.ask(config.spool, target)
    answer = cancel.wait_answer(request, found_s=CANCEL_FIND_S, ended_s=args.timeout)
    if args.json:
        print(json.dumps(answer or {"target": target, "status": "not_found"}, ensure_ascii=False))
    if answer is None:
        if not args.json:
            print(
                f"diffusiond: nothing called {target!r} is running, waiting or in the inbox of {config.spool} "
                "(a claim id, a job id, or a file's path in the inbox)",
                file=sys.stderr,
            )
        return 1
    status, source = answer.get("status"), answer.get("source")
    if not args.json:
        if status == "cancelled":
            print(f"cancelled {source} ({answer.get('claim_id')}): its inputs and report are in {answer.get('failed')}")
        elif status == "cancelling":
            print(f"diffusiond: {source} is still stopping after {args.timeout:g} s", file=sys.stderr)
        else:
            print(f"{source} ended ({status}) before it could be cancelled")
    return 3 if status == "cancelling" else 0


CANCEL_FIND_S = 10.0
"""How long `cancel` waits for a daemon to say it holds the target (each looks twice a second)."""


def _inbox_relative(target: str, config: Config) -> str:
    """A file given by its path (absolute, or from here) as the inbox knows it; anything else as given."""
    path = Path(target)
    if not (path.exists() or path.is_absolute()):
        return target
    inbox, folder = config.inbox.resolve(), path.absolute().parent.resolve()  # the name itself may be a link
    return (folder / path.name).relative_to(inbox).as_posix() if folder == inbox or inbox in folder.parents else target


def _retry(args: argparse.Namespace) -> int:
    """Exit 0 every failure named went back, 1 one could not (why on stderr), 2 nothing to retry."""
    from diffusiond.daemon.retry import RetryError, failures, find, retry

    config = _load(args)
    failed = config.folder("failed")
    if args.all == bool(args.files):
        print("diffusiond: name the failed files, or give --all (with --code C for one kind)", file=sys.stderr)
        return 2
    chosen = []
    code = 0
    if args.all:
        chosen = [f for f in failures(failed) if args.code is None or f.code == args.code]
    for name in args.files:
        try:
            found = find(failed, str(name))
        except RetryError as exc:
            print(f"diffusiond: {exc}", file=sys.stderr)
            code = 1
            continue
        if args.code is None or found.code == args.code:
            chosen.append(found)
    if not chosen and code == 0:
        print(f"diffusiond: nothing to retry in {failed}" + (f" with code {args.code}" if args.code else ""))
        return 2
    for failure in chosen:
        try:
            moved = retry(failure, config.inbox)
        except (RetryError, OSError) as exc:
            print(f"diffusiond: {exc}", file=sys.stderr)
            code = 1
            continue
        if moved:
            print(f"retrying {failure.source}: {', '.join(str(p) for p in moved)}")
        else:
            print(f"removed {failure.report.name}: its inputs are no longer in {failed}")
    return code


def _web(args: argparse.Namespace) -> int:
    """Serve the status page until interrupted; exit 2 on a wrong --listen or an unreadable token file."""
    import os

    from diffusiond.daemon.web import Site, serve

    setup_logging("INFO")
    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit():
        print(f"diffusiond: --listen {args.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8765", file=sys.stderr)
        return 2
    token = os.environ.get("DIFFUSIOND_WEB_TOKEN")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"diffusiond: --token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    cache = args.cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusiond" / "thumbs"
    serve(Site(_load(args), cache, token or None), host.strip("[]"), int(port))
    return 0


def _schema(_args: argparse.Namespace) -> int:
    from diffusiond.pipeline.job import job_schema

    print(json.dumps(job_schema(), indent=1, ensure_ascii=False))
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    """The state dir of the daemon run with these options: `--state-dir`, else the one the daemon of
    this spool and instance recorded (a unit's `run --state-dir`), else the config's."""
    if args.state_dir:
        return Path(args.state_dir).absolute()
    config = load_config(args.config, spool=args.spool, overrides={"instance": args.instance})
    return registry.recorded_state_dir(config) or config.state


def _reload(args: argparse.Namespace) -> int:
    """Exit 0: the daemon read the config and took it; 1: it refused it (the reason on stderr), or did not answer."""
    from diffusiond.daemon.status import ask_reload

    outcome = ask_reload(_state_dir(args), pid=args.pid, timeout_s=args.timeout)
    print(f"diffusiond: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
