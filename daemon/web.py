"""`diffusiond web`: the status page, a separate process that only reads the spool.

It reads each daemon's status.json, events.jsonl and metrics.prom (every daemon of the spool,
found through `<spool>/.daemons/`), the outbox's manifests and failed/'s reports. It never
touches a claim: a cancel is a request file (daemon/cancel.py) that the daemon holding the job
answers, a retry moves a failure's inputs from failed/ back into the inbox (daemon/retry.py),
and both need the token. So the page cannot break a daemon, and one page shows a cluster.

Pages: `/` (daemons, running jobs with live progress, queue, inbox, the latest results as
thumbnails, failures with their fix), `/result/<job_id>` (the images, prompt, parameters, seed,
model, watermark state and the job file that makes it again), `/events` (server-sent events from
the event streams), `/metrics` (Prometheus). Thumbnails are made once, in the page's own cache.
Starlette for the routes, Jinja2 (autoescaped) for the HTML; no external assets.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from diffusiond.daemon import cancel, metrics, registry
from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import read_json_object
from diffusiond.daemon.retry import RetryError, failures, find, retry
from diffusiond.daemon.status import STATUS_FILE, EventTail, is_running
from diffusiond.pipeline.job import job_file_fields

log = logging.getLogger(__name__)
RESULTS_SHOWN = 48
THUMB_PX = 256
_NAME = re.compile(r"[^/\\\x00]+")


@dataclass(frozen=True)
class Site:
    """What the page reads, and the token its buttons need (None: read-only)."""

    config: Config
    cache: Path
    token: str | None

    def state_dirs(self) -> dict[str, Path]:
        """Every daemon of the spool this page can read: the config's own, the live ones, the recorded ones."""
        found = {self.config.instance: registry.recorded_state_dir(self.config) or self.config.state}
        found |= {k: v for k, v in registry.recorded_state_dirs(self.config.spool).items() if k not in found}
        for entry in registry.live_daemons(self.config.spool):
            if entry.get("state_dir") and Path(str(entry["state_dir"])).is_dir():
                found.setdefault(str(entry.get("instance")), Path(str(entry["state_dir"])))
        return found

    def daemons(self) -> list[dict[str, Any]]:
        out = []
        for instance, state in self.state_dirs().items():
            status = read_json_object(state / STATUS_FILE)
            if status is not None:  # an older daemon's status lacks the newer lists
                known = {"queued": [], "inbox": {"count": 0, "files": []}, "running": [], "counters": {}}
                out.append(known | {"instance": instance, "alive": is_running(status)} | status)
        return out

    def manifests(self, limit: int = RESULTS_SHOWN) -> list[dict[str, Any]]:
        """The latest published jobs, newest first."""
        outbox = self.config.outbox
        paths = [p for p in outbox.glob("*.json") if not p.name.endswith(".failed.json")] if outbox.is_dir() else []
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        found = []
        for path in paths:
            manifest = read_json_object(path)
            if manifest is not None and manifest.get("status") == "done":
                found.append(manifest)
            if len(found) >= limit:
                break
        return found

    def manifest(self, job_id: str) -> dict[str, Any] | None:
        if not _NAME.fullmatch(job_id):
            return None
        manifest = read_json_object(self.config.outbox / f"{job_id}.json")
        return manifest if manifest is not None and manifest.get("status") == "done" else None

    def allowed(self, given: str | None) -> bool:
        return self.token is not None and given is not None and secrets.compare_digest(given, self.token)


def job_yaml(manifest: dict[str, Any], config: Config) -> str:
    """The job file that makes this result again: its fields as run, its seed fixed, and only the
    fields at their defaults left out that no default of the config (all, the task's, the model's) sets."""
    job = dict(manifest.get("job") or {})
    job.pop("sweep", None)  # a sweep's values are in the fields themselves
    if seeds := manifest.get("seeds"):
        job["seed"] = seeds[0]
    model = config.models.get(str(job.get("model")))
    layers = [config.defaults.get("all", {}), config.defaults.get(str(job.get("task")), {})]
    keep = {key for layer in [*layers, model.defaults if model else {}] for key in layer}
    return yaml.safe_dump(job_file_fields(job, keep), sort_keys=False, allow_unicode=True, width=100)


def thumbnail(site: Site, name: str) -> Path | None:
    """A small JPEG of an outbox image, made once (keyed by the file's size and time) in the page's cache."""
    source = site.config.outbox / name
    try:
        stat = source.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(errors="surrogateescape")).hexdigest()
    target = site.cache / f"{key[:32]}.jpg"
    if target.exists():
        return target
    site.cache.mkdir(parents=True, exist_ok=True)
    try:
        with Image.open(source) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            temp = target.with_name(f".{target.name}.{os.getpid()}")
            image.convert("RGB").save(temp, "JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    os.replace(temp, target)
    return target


TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape(default=True)
)


def app(site: Site) -> Starlette:
    """The page's routes over `site`."""

    def render(name: str, **values: Any) -> HTMLResponse:
        values |= {"spool": str(site.config.spool)}
        return HTMLResponse(TEMPLATES.get_template(f"{name}.html").render(**values))

    async def index(request: Request) -> Response:
        daemons, results = await run_in_threadpool(lambda: (site.daemons(), site.manifests()))
        found = await run_in_threadpool(failures, site.config.folder("failed"))
        failed = [_failure_row(f) for f in reversed(found)][:50]
        token = site.token if site.allowed(request.query_params.get("token")) else None
        return render("index", daemons=daemons, results=results, failed=failed, token=token)

    async def result(request: Request) -> Response:
        manifest = await run_in_threadpool(site.manifest, request.path_params["job_id"])
        if manifest is None:
            return HTMLResponse("<p>No such result.</p>", status_code=404)
        return render("result", m=manifest, job=job_yaml(manifest, site.config))

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        path = site.config.outbox / name
        if not _NAME.fullmatch(name) or name.endswith(".json") or not path.is_file():
            return Response("not found", status_code=404)
        return FileResponse(path)

    async def thumb(request: Request) -> Response:
        name = request.path_params["name"]
        made = await run_in_threadpool(thumbnail, site, name) if _NAME.fullmatch(name) else None
        return FileResponse(made, media_type="image/jpeg") if made else Response("not found", status_code=404)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            tail = EventTail(list(site.state_dirs().values()))
            yield ": diffusiond events\n\n"
            while not await request.is_disconnected():
                for event in tail.new():
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def metrics_page(_request: Request) -> Response:
        registry_ = CollectorRegistry(auto_describe=False)
        registry_.register(metrics.SpoolMetrics(lambda: [(i, d / metrics.FILE) for i, d in site.state_dirs().items()]))
        return Response(await run_in_threadpool(generate_latest, registry_), media_type=CONTENT_TYPE_LATEST)

    async def cancel_job(request: Request) -> Response:
        form = await request.form()
        if not site.allowed(str(form.get("token") or "")):
            return Response("cancel needs the page's token (diffusiond web --token-file)", status_code=403)
        cancel.ask(site.config.spool, str(form.get("target") or ""))
        return RedirectResponse(f"/?token={site.token}", status_code=303)

    async def retry_job(request: Request) -> Response:
        form = await request.form()
        if not site.allowed(str(form.get("token") or "")):
            return Response("retry needs the page's token (diffusiond web --token-file)", status_code=403)
        try:
            failure = find(site.config.folder("failed"), str(form.get("file") or ""))
            await run_in_threadpool(retry, failure, site.config.inbox)
        except (RetryError, OSError) as exc:
            return HTMLResponse(f"<p>{html.escape(str(exc))}</p>", status_code=409)
        return RedirectResponse(f"/?token={site.token}", status_code=303)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/result/{job_id}", result),
            Route("/image/{name}", image),
            Route("/thumb/{name}", thumb),
            Route("/events", events),
            Route("/metrics", metrics_page),
            Route("/cancel", cancel_job, methods=["POST"]),
            Route("/retry", retry_job, methods=["POST"]),
        ]
    )


def _failure_row(failure: Any) -> dict[str, Any]:
    report: dict[str, Any] = {}
    try:
        loaded = yaml.safe_load(failure.report.read_text(encoding="utf-8"))
        report = loaded if isinstance(loaded, dict) else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass
    return {
        "source": failure.source,
        "code": failure.code,
        "error": report.get("error", ""),
        "fix": report.get("fix", ""),
        "report": failure.report.name,
    }


def serve(site: Site, host: str, port: int) -> None:
    """Run the page until interrupted (uvicorn: SIGTERM and Ctrl-C stop it)."""
    import uvicorn

    log.info(
        "diffusiond web on http://%s:%d/ for %s (%s)",
        host,
        port,
        site.config.spool,
        "cancel and retry with the token" if site.token else "read-only",
    )
    # An open event stream never ends by itself: without a grace limit SIGTERM waits for the browser.
    uvicorn.run(app(site), host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
