"""The daemon's config: every field has a default, so `diffusiond run --spool DIR` needs no file.

Relative paths in a config file are taken relative to that file's folder.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from diffusiond.pipeline.backend import ExtraNetworks
from diffusiond.pipeline.errors import ConfigError, JobRejected
from diffusiond.pipeline.families import ModelEntry, kind_of_path, native_size
from diffusiond.pipeline.job import (
    TASKS,
    InvisibleWatermark,
    Limits,
    Rules,
    Task,
    VisibleWatermark,
    WatermarkSpec,
    check_default_fields,
    validate_job,
)
from diffusiond.pipeline.metadata import MetadataOptions
from diffusiond.pipeline.provenance import Marks, marks_for

if TYPE_CHECKING:
    from diffusiond.pipeline.c2pa_sign import C2paConfig

SYSTEM_CONFIG = Path("/etc/diffusiond/config.yaml")
DEFAULT_SPOOL = Path("/var/lib/diffusiond/spool")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Folders(_Strict):
    """Each folder defaults to `<spool>/<name>`; `work` must share a filesystem with `inbox` (claims are renames)."""

    inbox: Path | None = None
    outbox: Path | None = None
    archive: Path | None = None
    failed: Path | None = None
    work: Path | None = None


class Watch(_Strict):
    """How the inbox is watched."""

    mode: Literal["auto", "inotify", "poll"] = "auto"
    """`poll` for network folders (SMB/NFS), where inotify sees no remote writes."""
    settle_s: float = Field(1.0, ge=0)
    """A file written in place must stay unchanged this long before it is read."""
    pair_wait_s: float = Field(5.0, ge=0)
    """How long a job file waits for its images, and a bare image for its job file."""
    rescan_interval_s: float = Field(30.0, gt=0)
    """Full rescans catch what events miss (events dropped under load, network folders)."""
    poll_interval_s: float = Field(1.0, gt=0)


class NamedFiles(Mapping[str, Path]):
    """A folder's files of the given suffixes by name (their path in it without the extension), listed
    at each use. Links that lead out of the folder are not followed: only files under it load."""

    def __init__(self, root: Path, suffixes: tuple[str, ...], *, folders_with: str | None = None) -> None:
        self.root = root
        self.suffixes = suffixes
        self.folders_with = folders_with
        """A folder holding this file is one entry (a diffusers model folder), and what is in it is not."""

    def _files(self) -> dict[str, Path]:
        root = self.root.resolve()
        found: dict[str, Path] = {}
        folders: list[Path] = []
        for path in sorted(self.root.rglob("*")) if self.root.is_dir() else []:
            if not path.resolve().is_relative_to(root) or any(path.is_relative_to(f) for f in folders):
                continue
            if self.folders_with and path.is_dir() and (path / self.folders_with).is_file():
                folders.append(path)
                found[path.relative_to(self.root).as_posix()] = path
            elif path.suffix.lower() in self.suffixes and path.is_file():
                found[path.relative_to(self.root).with_suffix("").as_posix()] = path
        return found

    def __getitem__(self, name: str) -> Path:
        return self._files()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files())

    def __len__(self) -> int:
        return len(self._files())


class ModelSpec(_Strict):
    """A `models:` entry written as a mapping; a bare path is `{path: ...}`."""

    path: Path
    config: Path | None = None
    """For a single .safetensors/.ckpt: a diffusers folder with its configs and tokenizer(s)."""
    prediction: Literal["epsilon", "v_prediction"] | None = None
    """Say `v_prediction` for an SD 2.x 768-v single file (its weights cannot tell)."""
    vae: Path | None = None
    """A VAE to use instead of the model's own: a diffusers AutoencoderKL folder, or a single
    `.safetensors` file in the original layout (A1111's `*.vae.safetensors`)."""
    defaults: dict[str, Any] = {}

    @field_validator("vae")
    @classmethod
    def _vae_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() in (".pt", ".ckpt", ".bin"):
            raise ValueError(
                f"{value.name}: a VAE must be a .safetensors file or a diffusers folder (a pickled .pt/.ckpt "
                "can run code when loaded); convert it once, e.g. with diffusers' AutoencoderKL.from_single_file "
                "and save_pretrained"
            )
        return value

    """Job field defaults for this model, over the task defaults (e.g. SD 2's habitual negative prompt)."""


class WatermarkConfig(_Strict):
    """The marks every image gets unless a job turns one off (`watermark: {visible: false}`)."""

    invisible: InvisibleWatermark | None = InvisibleWatermark(text="diffusiond", method="tiled")
    """None: no invisible mark. `tiled` survives recompression, resizing and crops (see README); dwtDct is SD's own."""
    visible: VisibleWatermark | None = None
    logo: Path | None = None
    """A logo image (PNG with alpha) drawn instead of the visible text; only the config can name a file."""
    required: bool = False
    """Refuse jobs that turn the invisible mark off, and fail images too small to carry it."""

    @field_validator("invisible", "visible", mode="before")
    @classmethod
    def _switch(cls, value: Any, info: ValidationInfo) -> Any:
        """`false` is off here as in a job's `watermark:`; `true` is the default mark (the visible one's text)."""
        if value is False:
            return None
        if value is True:
            default = cls.model_fields[str(info.field_name)].default
            return default if default is not None else {}  # visible's default is off: its own defaults, then
        return value


class MetadataConfig(MetadataOptions):
    """What each image carries about how it was made; each part can be turned off (fields: MetadataOptions)."""

    c2pa: C2paSettings | None = None
    """Content credentials signed after all other metadata is written (so the signature covers it)."""


class C2paSettings(_Strict):
    """Sign each image with C2PA content credentials (needs the `c2pa` extra)."""

    cert_chain: Path
    """PEM: the signing certificate first, then its intermediates."""
    private_key: Path
    """PEM (PKCS#8) key of the signing certificate."""
    algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = "es256"
    tsa_url: str | None = None
    """A time-stamping authority; none by default (diffusiond makes no network calls of its own)."""


class LimitsConfig(_Strict):
    max_pixels: int = Field(2048 * 2048, gt=0)
    max_steps: int = Field(150, gt=0)
    max_count: int = Field(16, gt=0)
    max_file_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_jobs_per_file: int = Field(1_000, gt=0)
    """Jobs (YAML documents) in one file; the rest of a larger file is not even parsed."""
    max_crashes: int = Field(3, gt=0)
    """Runs of one claim that may end in a crash of the daemon before it goes to failed/ (`crashed`)."""
    max_takeovers: int = Field(3, gt=0)
    """Times one claim may be taken over from a slot whose lease ran out; at this many it goes to failed/
    (`node_lost`), so a job that hangs or kills its host does not hop around the cluster."""


HOOK_FIELDS = ("manifest", "job_id", "claim_id", "source", "outbox", "report", "event")
"""What a hook's arguments may name in braces (`{manifest}`), and its environment gets as DIFFUSIOND_<NAME>."""


class HooksConfig(_Strict):
    """Commands run after a job ends (daemon/hooks.py): argv lists, run without a shell."""

    on_done: list[str] = []
    """Run after each job's manifest is in the outbox."""
    on_failed: list[str] = []
    """Run after a failed or rejected file's inputs and report are in failed/."""
    timeout_s: float = Field(60.0, gt=0)
    """A hook still running after this long is killed (with everything it started)."""

    @field_validator("on_done", "on_failed")
    @classmethod
    def _placeholders(cls, argv: list[str]) -> list[str]:
        blank = dict.fromkeys(HOOK_FIELDS, "")
        for argument in argv:
            try:
                argument.format_map(blank)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"hook argument {argument!r}: {exc!s} is not one of {{{'}, {'.join(HOOK_FIELDS)}}} "
                    "(write {{ and }} for literal braces)"
                ) from None
        return argv


class WebhookConfig(_Strict):
    """One receiver of job events (daemon/webhooks.py): CloudEvents 1.0 POSTed, signed, at least once."""

    url: str
    """http:// or https://; the daemon sends only to the URLs named here."""
    secret: str | None = None
    """HMAC-SHA256 key for the `X-Diffusiond-Signature: sha256=<hex>` header (or `secret_file`)."""
    secret_file: Path | None = None
    """A file holding the secret (kept out of the config), relative to the config file."""
    events: list[Literal["done", "failed"]] = ["done", "failed"]
    timeout_s: float = Field(10.0, gt=0)
    """Per attempt; a receiver slower than this is tried again later."""

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"a webhook url must start with http:// or https://, got {value!r}")
        return value


class ClusterConfig(_Strict):
    """`diffusiond cluster`: slots on a Ray cluster (daemon/cluster.py); the spool still decides who owns a job."""

    address: str = "auto"
    """The Ray cluster to join (`ray.init(address=...)`): `auto` finds the one `ray start` runs on this host."""
    slots: int | Literal["auto"] = "auto"
    """How many slots (`gpu-00`, `gpu-01`, ...). `auto`: one per `resource` the cluster has, so a node that
    joins with a GPU gets a slot."""
    resource: str = "GPU"
    """What one slot reserves, one unit of: `GPU` (Ray's num_gpus, which also sets CUDA_VISIBLE_DEVICES), or
    the name of a custom resource (`ray start --resources '{"diffusiond": 2}'`) for nodes without GPUs."""
    state_dir: Path = Path("/var/lib/diffusiond/cluster")
    """Each slot's local state dir is `<state_dir>/<slot>` on the node that runs it (never on the share)."""
    reconcile_s: float = Field(5.0, gt=0)
    """How often the driver compares the slots with the cluster's resources."""

    @field_validator("slots")
    @classmethod
    def _slots(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 1000:
            raise ValueError("must be auto or 0 to 1000")
        return value


class Config(_Strict):
    """The whole config file, validated: README "The config" lists the fields.

    Build it with `load_config`, which also makes its paths absolute (relative to the config
    file), applies command-line overrides and checks the profiles and sketch job as jobs. A
    reload builds a new Config; the daemon swaps it in only if it loads.
    """

    spool: Path = DEFAULT_SPOOL
    folders: Folders = Folders()
    instance: str = Field(default_factory=socket.gethostname)
    """Names this daemon's work folder (`work/<instance>/`), so daemons can share a spool."""
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    memory: Literal["auto", "normal", "low", "minimal"] = "auto"
    """`auto`: start at normal, step down one level when a job runs out of memory, remember per model."""
    models: dict[str, ModelSpec] = {}
    loras: Path | dict[str, Path] | None = None
    """LoRA files jobs may use: a folder (each `*.safetensors` under it, named by its path without the
    extension, e.g. `film-grain`, `style/ink`), or names mapped to files. Only these load."""
    embeddings: Path | dict[str, Path] | None = None
    """Textual-inversion embeddings: a folder (each `*.safetensors`, `*.pt`, `*.bin` under it, named by
    its path without the extension) or names mapped to files; a prompt that names one uses it."""
    controlnets: Path | dict[str, Path] | None = None
    """ControlNet models jobs may use (`control: {model: NAME}`): a folder (each diffusers ControlNet
    folder, with its config.json, and each `*.safetensors` under it, named by its path without the
    extension) or names mapped to folders or files."""
    max_loaded_models: int = Field(2, ge=1)
    """Models kept warm at once; the least recently used is unloaded to make room."""
    preload: list[str] = []
    """Models loaded before the daemon reports ready."""
    batch_size: int = Field(1, ge=1)
    """Images per pipeline call when jobs can share one (same model, task, size, steps, ...)."""
    batch_wait_s: float = Field(0.0, ge=0)
    """With batch_size > 1: how long the worker waits for more claims before starting a call."""
    state_dir: Path | None = None
    """Local state (status, events, model hash cache); default `<spool>/.state/<instance>`. Keep it off shares."""
    defaults: dict[str, dict[str, Any]] = {}
    """Field defaults for jobs: key `all`, then one key per task."""
    profiles: dict[str, dict[str, Any]] = {}
    reproduce: str | None = None
    """An inbox folder (e.g. `reproduce`): an image dropped there runs again with the parameters it carries."""
    """Hot folders: an image dropped in `inbox/<name>/` runs this job."""
    sketch_job: dict[str, Any] | None = None
    """The job for a bare image in the inbox root; None sends such images to failed/."""
    limits: LimitsConfig = LimitsConfig()
    watermark: WatermarkConfig = WatermarkConfig()
    metadata: MetadataConfig = MetadataConfig()
    watch: Watch = Watch()
    on_success: Literal["archive", "delete"] = "archive"
    hooks: HooksConfig = HooksConfig()
    notify: list[WebhookConfig] = []
    """Webhooks: where to POST a CloudEvent for each job done or failed (off when empty)."""
    outbox_failures: bool = False
    """Also write `outbox/<job_id>.failed.json` for a failed or rejected job: one folder says done or failed."""
    job_stall_s: float = Field(600.0, gt=0)
    """A running job that finishes no step for this long counts as hung: systemd watchdog pings stop."""
    prefetch: int = Field(2, ge=1)
    """Jobs claimed ahead of the running one; small, so other daemons on the spool get work too."""
    threads: int | Literal["auto"] = "auto"
    """torch's CPU threads for generation. `auto`: one fewer than the CPUs this process may use
    (its affinity and cgroup quota), at least 1, so stamping and writing keep a core: under CPU
    contention 2 torch threads on 2 cores ran 3.9x slower than 1 (bench/threads.py)."""
    stamp_threads: int | Literal["auto"] = "auto"
    """Threads that stamp a job's images at once (marks, their check, metadata, encoding: numpy, SciPy and
    Pillow release the GIL there). `auto`: on CUDA one fewer than the usable CPUs; on the CPU the CPUs
    torch's `threads:` leave (1 with both `auto`); at least 1. Threads scaled as
    well as processes (bench/stamp.py: 1.6x with 2 on 2 CPUs) without copying images between processes."""
    disk_full_retry_s: float = Field(30.0, gt=0)
    """A job that found the disk full waits this long in work/ before it is tried again (it is not failed)."""
    lease_timeout_s: float = Field(120.0, ge=0)
    """A daemon touches `work/<instance>/.lease` while it is healthy; when another daemon's lease is older
    than this (by the file server's clock), its claims are taken over (daemon/lease.py). 0: never."""
    cluster: ClusterConfig = ClusterConfig()

    _rules: Rules | None = PrivateAttr(None)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from (None: none, the built-in defaults)."""
        return self._source

    @field_validator("threads", "stamp_threads")
    @classmethod
    def _threads(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or at least 1")
        return value

    def torch_threads(self) -> int:
        """The number `threads:` means on this machine now."""
        return self.threads if isinstance(self.threads, int) else max(1, usable_cpus() - 1)

    def stamp_workers(self) -> int:
        """The number `stamp_threads:` means on this machine now: on a GPU the CPUs less one; on the CPU
        what torch's threads leave (the writer stamps while the next batch generates)."""
        if isinstance(self.stamp_threads, int):
            return self.stamp_threads
        torch = sys.modules.get("torch")  # loaded by then wherever a real model runs; never imported here
        on_gpu = self.device.startswith(("cuda", "mps")) or (
            self.device == "auto" and torch is not None and torch.cuda.is_available()
        )
        return max(1, usable_cpus() - 1 if on_gpu else usable_cpus() - self.torch_threads())

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("defaults")
    @classmethod
    def _defaults_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = set(value) - {"all", *TASKS}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; use all, {', '.join(TASKS)}")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _model_paths(cls, value: Any) -> Any:
        """`name: path` is short for `name: {path: path}`."""
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str | Path) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _required_mark_exists(self) -> Config:
        if self.watermark.required and self.watermark.invisible is None:
            raise ValueError("watermark.required is true but watermark.invisible is off")
        return self

    def metadata_options(self) -> MetadataOptions:
        return self.metadata

    def c2pa(self) -> C2paConfig | None:
        """The signer settings, or None when images are not signed."""
        settings = self.metadata.c2pa
        if settings is None:
            return None
        from diffusiond.pipeline.c2pa_sign import C2paConfig

        return C2paConfig(settings.cert_chain, settings.private_key, settings.algorithm, settings.tsa_url)

    def marks(self, job: WatermarkSpec) -> Marks:
        """The marks a job's images get: the config's, with the job's `watermark:` laid over them."""
        return marks_for(
            job,
            invisible=self.watermark.invisible,
            visible=self.watermark.visible,
            logo=self.watermark.logo,
            required=self.watermark.required,
        )

    @model_validator(mode="after")
    def _preload_known(self) -> Config:
        unknown = [name for name in self.preload if name not in self.models]
        if unknown:
            raise ValueError(f"preload names models that are not in `models:`: {', '.join(unknown)}")
        return self

    def folder(self, name: str) -> Path:
        return getattr(self.folders, name) or self.spool / name

    @property
    def inbox(self) -> Path:
        return self.folder("inbox")

    @property
    def outbox(self) -> Path:
        return self.folder("outbox")

    @property
    def work_dir(self) -> Path:
        """This daemon's own work folder."""
        return self.folder("work") / self.instance

    @property
    def state(self) -> Path:
        """This daemon's own: daemons sharing a spool must not interleave their status and events."""
        return self.state_dir or self.spool / ".state" / self.instance

    def model_entries(self) -> dict[str, ModelEntry]:
        return {
            name: ModelEntry(name, spec.path, kind_of_path(spec.path), spec.config, spec.prediction, spec.vae)
            for name, spec in self.models.items()
        }

    def lora_files(self) -> Mapping[str, Path]:
        """The LoRAs by name; a folder is listed again at each use, so a file dropped in it is found."""
        if isinstance(self.loras, dict):
            return dict(self.loras)
        return NamedFiles(self.loras, (".safetensors",)) if self.loras is not None else {}

    def embedding_files(self) -> Mapping[str, Path]:
        """The textual-inversion embeddings by name, listed like the LoRAs."""
        if isinstance(self.embeddings, dict):
            return dict(self.embeddings)
        return NamedFiles(self.embeddings, (".safetensors", ".pt", ".bin")) if self.embeddings is not None else {}

    def controlnet_files(self) -> Mapping[str, Path]:
        """The ControlNets by name: diffusers folders and single files, listed at each use like the LoRAs."""
        if isinstance(self.controlnets, dict):
            return dict(self.controlnets)
        if self.controlnets is None:
            return {}
        return NamedFiles(self.controlnets, (".safetensors",), folders_with="config.json")

    def extra_networks(self) -> ExtraNetworks:
        """The LoRA, embedding and ControlNet files a job may load, for the generator."""
        return ExtraNetworks(
            loras=self.lora_files(), embeddings=self.embedding_files(), controlnets=self.controlnet_files()
        )

    def rules(self) -> Rules:
        """What jobs are validated against; read from the model folders once per loaded config.

        Every claim is validated, so this must not re-read each model's configs and
        headers each time; a reload builds a new Config and so reads them again.
        """
        if self._rules is None:
            self._rules = self._build_rules()
        return self._rules

    def _build_rules(self) -> Rules:
        entries = self.model_entries()
        sizes = {name: native_size(e.path, e.kind, e.prediction) for name, e in entries.items()}
        return Rules(
            models={name: entry.kind for name, entry in entries.items()},
            defaults=self.defaults,
            limits=Limits(
                max_pixels=self.limits.max_pixels,
                max_steps=self.limits.max_steps,
                max_count=self.limits.max_count,
                max_file_bytes=self.limits.max_file_bytes,
                max_jobs_per_file=self.limits.max_jobs_per_file,
            ),
            model_defaults={name: spec.defaults for name, spec in self.models.items() if spec.defaults},
            loras=self.lora_files(),
            controlnets=self.controlnet_files(),
            native_sizes={name: size for name, size in sizes.items() if size},
            watermark_required=self.watermark.required,
        )

    def check_jobs(self) -> None:
        """Validate the profiles and sketch job now, so a bad one stops the start, not a user's job."""
        if self.reproduce is not None and (
            self.reproduce in self.profiles or not re.fullmatch(r"[^/\\.][^/\\]*", self.reproduce)
        ):
            raise ConfigError(
                f"reproduce: {self.reproduce!r} must be a folder name of its own in the inbox, not a profile's",
                field="reproduce",
                value=self.reproduce,
                fix="name a folder such as `reproduce` that no profile uses",
            )
        layers = {
            f"defaults.{key}": (fields, list(Task) if key == "all" else [Task(key)])
            for key, fields in self.defaults.items()
        }
        layers |= {f"models.{name}.defaults": (spec.defaults, list(Task)) for name, spec in self.models.items()}
        for label, (fields, tasks) in layers.items():
            try:
                check_default_fields(fields, tasks)
            except JobRejected as exc:
                raise ConfigError(
                    f"{label}: {exc.message}", field=f"{label}.{exc.field}", value=exc.value, fix=exc.fix
                ) from exc
        rules = self.rules()
        templates = {f"profiles.{n}": p for n, p in self.profiles.items()}
        if self.sketch_job is not None:
            templates["sketch_job"] = self.sketch_job
        for label, template in templates.items():
            if template.get("task", "txt2img") == "txt2img" and not template.get("control"):
                raise ConfigError(
                    f"{label} must be an img2img or upscale job, or a txt2img job with `control:` (it runs on a "
                    "dropped image)",
                    field=f"{label}.task",
                    value=template.get("task"),
                    fix="set `task: img2img` or `task: upscale`, or add `control: {model: NAME}` to guide txt2img "
                    "by the image",
                )
            try:
                spec = validate_job({"image": "sketch.png"} | dict(template), path=label, index=1, rules=rules)
            except JobRejected as exc:
                raise ConfigError(
                    f"{label}: {exc.message}",
                    field=f"{label}.{exc.field}" if exc.field else label,
                    value=exc.value,
                    fix=exc.fix,
                ) from exc
            if not spec.needs_image:
                raise ConfigError(
                    f"{label}: every control names its own image, so the dropped image would not be used",
                    field=f"{label}.control",
                    value=[use.model for use in spec.control],
                    fix="leave `image:` out of one control: it then reads the dropped image",
                )


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 quota (systemd's CPUQuota=)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


LOCAL_CONFIG = Path("config.yaml")
"""`diffusiond run` in a folder that `diffusiond init` made reads that folder's config."""


def config_file(given: Path | None) -> Path | None:
    """The config a command reads: `--config`, else ./config.yaml, else /etc/diffusiond/config.yaml, else none."""
    if given is not None:
        return given
    for candidate in (LOCAL_CONFIG, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate.absolute()
    return None


def load_config(
    path: Path | None = None, *, spool: Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read the config file (or none), apply `--spool` and other command-line `overrides`, check it completely."""
    data: dict[str, Any] = {}
    path = config_file(path)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}", path=str(path), fix="fix the file") from exc
        if not isinstance(data, dict):
            raise ConfigError("the config must be a mapping", path=str(path), fix="write `key: value` lines")
    data |= {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise ConfigError(
            f"{error['msg']}, got {error.get('input')!r}",
            path=str(path) if path else None,
            field=field,
            value=error.get("input"),
            fix="correct the field (see examples/config.yaml for every field)",
        ) from exc
    base = path.parent if path is not None else Path.cwd()
    config.spool = _clean(spool if spool is not None else base / config.spool)
    for name in Folders.model_fields:
        value = getattr(config.folders, name)
        if value is not None:
            setattr(config.folders, name, _clean(base / value))
    config.cluster.state_dir = _clean(base / config.cluster.state_dir)
    for name, spec in config.models.items():
        spec.path = _clean(base / spec.path)
        spec.config = _clean(base / spec.config) if spec.config else None
        spec.vae = _clean(base / spec.vae) if spec.vae else None
        if not spec.path.exists():
            raise ConfigError(
                f"model {name!r}: {spec.path} does not exist",
                path=str(path) if path else None,
                field=f"models.{name}",
                value=str(spec.path),
                fix="point it at a diffusers folder (with model_index.json) or a .safetensors/.ckpt file "
                "(a relative path is from the config file's folder), or remove the entry",
            )
    for name in ("loras", "embeddings", "controlnets"):
        value = getattr(config, name)
        if isinstance(value, dict):
            setattr(config, name, {key: _clean(base / file) for key, file in value.items()})
        elif value is not None:
            setattr(config, name, _clean(base / value))
    for index, hook in enumerate(config.notify):
        if hook.secret_file is not None:
            hook.secret_file = _clean(base / hook.secret_file)
            try:
                hook.secret = hook.secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"notify[{index}].secret_file {hook.secret_file}: {exc.strerror}",
                    path=str(path) if path else None,
                    field=f"notify.{index}.secret_file",
                    value=str(hook.secret_file),
                    fix="point it at a readable file that holds the secret",
                ) from exc
    if config.metadata.c2pa is not None:
        settings = config.metadata.c2pa
        settings.cert_chain, settings.private_key = (
            _clean(base / settings.cert_chain),
            _clean(base / settings.private_key),
        )
        for name in ("cert_chain", "private_key"):
            if not getattr(settings, name).is_file():
                raise ConfigError(
                    f"metadata.c2pa.{name} {getattr(settings, name)} is not a file",
                    path=str(path) if path else None,
                    field=f"metadata.c2pa.{name}",
                    value=str(getattr(settings, name)),
                    fix="point it at the PEM file, or remove metadata.c2pa to write images unsigned",
                )
    if config.watermark.logo is not None:
        config.watermark.logo = _clean(base / config.watermark.logo)
        if not config.watermark.logo.is_file():
            raise ConfigError(
                f"watermark.logo {config.watermark.logo} is not a file",
                path=str(path) if path else None,
                field="watermark.logo",
                value=str(config.watermark.logo),
                fix="point watermark.logo at a PNG (with alpha) that exists",
            )
    if config.state_dir is not None:
        config.state_dir = _clean(base / config.state_dir)
    config.check_jobs()
    config._source = _clean(path) if path is not None else None
    return config


def _clean(path: Path) -> Path:
    """Absolute and without `..` (normpath, not resolve: a symlinked share keeps the name it was given)."""
    return Path(os.path.normpath(path.absolute()))
