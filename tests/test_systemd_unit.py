"""The units pass `systemd-analyze verify` with no warning at all and keep their exposure score;
the sysusers/tmpfiles snippets and systemd/install.sh do what they say, in a scratch root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CEILING_S

UNITS = Path(__file__).parent.parent / "systemd"
SHIPPED_BINARY = "/opt/diffusiond/venv/bin/diffusiond"
# systemd-analyze security --offline=true: both units score 0.7 (systemd 252). Lower it when the
# hardening gets better; never raise it without saying why in the unit.
MAX_EXPOSURE = 0.8
# The status page must answer on a socket (PrivateNetwork= and no AF_INET would cost it that: 0.8 of it).
MAX_EXPOSURE_OF = {"diffusiond-web.service": 1.1}
# The cluster's units must talk to the cluster's hosts (Ray): 1.9 and 1.7 (systemd 252).
MAX_EXPOSURE_OF |= {"diffusiond-ray-head.service": 1.9, "diffusiond-ray-node.service": 1.9}
MAX_EXPOSURE_OF |= {"diffusiond-cluster.service": 1.7}
# The unit files under test, as verify needs them: the template instantiated (GPU 0).
UNIT_FILES = {
    "diffusiond.service": "diffusiond.service",
    "diffusiond@0.service": "diffusiond@.service",
    "diffusiond-web.service": "diffusiond-web.service",
    "diffusiond-ray-head.service": "diffusiond-ray-head.service",
    "diffusiond-ray-node.service": "diffusiond-ray-node.service",
    "diffusiond-cluster.service": "diffusiond-cluster.service",
}
# The [Service] settings the template may set differently from diffusiond.service.
PER_INSTANCE = {
    "Environment",
    "StateDirectory",
    "CacheDirectory",
    "ExecStart",
    "ExecReload",
    "SyslogIdentifier",
    "DeviceAllow",
}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles chowns to the service user: needs root")


def _unit(tmp_path: Path, name: str) -> Path:
    # verify checks that ExecStart exists: point it at this environment's diffusiond.
    installed = Path(sys.executable).parent / "diffusiond"
    assert installed.exists(), "install the package (make setup) first"
    text = (UNITS / UNIT_FILES[name]).read_text()
    if "venv/bin/ray " in text and not (installed.parent / "ray").exists():
        pytest.skip("the Ray units need the cluster extra (make test-cluster installs it)")
    unit = tmp_path / name
    unit.write_text(text.replace(str(Path(SHIPPED_BINARY).parent), str(installed.parent)))
    if name == "diffusiond-cluster.service":  # Requires= the head's unit: verify looks for it beside
        _unit(tmp_path, "diffusiond-ray-head.service")
    return unit


def _service_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@needs_analyze
@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_verifies_cleanly(tmp_path: Path, name: str) -> None:
    # The service user need not exist here: verify does not resolve User= (it prints nothing for it).
    result = subprocess.run(
        ["systemd-analyze", "verify", str(_unit(tmp_path, name))], capture_output=True, text=True, timeout=CEILING_S
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("name", UNIT_FILES)
def test_exposure_does_not_get_worse(tmp_path: Path, name: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_unit(tmp_path, name))],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    print(f"{name}: exposure {found[1]} {found[2]}")
    assert float(found[1]) <= MAX_EXPOSURE_OF.get(name, MAX_EXPOSURE), result.stdout


def test_template_keeps_the_same_hardening() -> None:
    plain, template = _service_settings(UNITS / "diffusiond.service"), _service_settings(UNITS / "diffusiond@.service")
    differ = {key for key in plain.keys() | template.keys() if plain.get(key) != template.get(key)}
    assert differ <= PER_INSTANCE, differ
    for settings in (plain, template):
        # They break CUDA and PyTorch (see the comments in the units).
        assert settings["PrivateDevices"] == ["no"] and settings["MemoryDenyWriteExecute"] == ["no"]
        assert settings["DevicePolicy"] == ["closed"] and "DynamicUser" not in settings
    assert "/dev/nvidia%i rw" in template["DeviceAllow"]
    assert "--instance %H-gpu%i" in template["ExecStart"][0] and "--device cuda:0" in template["ExecStart"][0]


@needs_root
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_install_script_in_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    script = str(UNITS / "install.sh")
    run = subprocess.run(
        [script, "--root", str(root), "--no-venv", "--gpus", "0,1", "--prefix", "/opt/d2", "--spool", "/srv/spool"],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "systemctl enable --now diffusiond@0.service diffusiond@1.service" in run.stdout
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    uid, gid = int(passwd["diffusiond"][2]), int(passwd["diffusiond"][3])
    for name in ("", "inbox", "outbox", "archive", "failed", "work"):
        folder = (root / "srv/spool" / name).stat()
        assert (folder.st_mode & 0o7777, folder.st_uid, folder.st_gid) == (0o2775, uid, gid), name
    template = (root / "etc/systemd/system/diffusiond@.service").read_text()
    assert "ExecStart=/opt/d2/venv/bin/diffusiond run" in template and "ReadWritePaths=/srv/spool\n" in template
    config = (root / "etc/diffusiond/config.yaml").read_text()
    assert "spool: /srv/spool" in config

    from diffusiond.daemon.config import load_config

    assert load_config(root / "etc/diffusiond/config.yaml").spool == Path("/srv/spool")
    # Again: nothing changes, the config stays.
    (root / "etc/diffusiond/config.yaml").write_text(config + "# mine\n")
    again = subprocess.run([script, "--root", str(root), "--no-venv", "--spool", "/srv/spool"], capture_output=True)
    assert again.returncode == 0 and (root / "etc/diffusiond/config.yaml").read_text().endswith("# mine\n")

    gone = subprocess.run(
        [script, "--root", str(root), "--uninstall"], capture_output=True, text=True, timeout=CEILING_S
    )
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not list((root / "etc/systemd/system").glob("diffusiond*"))
    assert (root / "etc/diffusiond/config.yaml").exists() and (root / "srv/spool/inbox").is_dir()


@needs_root
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_install_script_sets_up_a_cluster_host(tmp_path: Path) -> None:
    """`--cluster head` installs the Ray head and the driver, `--cluster node` a Ray node, with this
    install's paths; neither starts before the addresses and the token are there, and says so."""
    root = tmp_path / "root"
    root.mkdir()
    script = str(UNITS / "install.sh")
    common = ["--root", str(root), "--no-venv", "--prefix", "/opt/d2", "--spool", "/srv/spool"]

    def install(role: str) -> str:
        run = subprocess.run([script, *common, "--cluster", role], capture_output=True, text=True, timeout=CEILING_S)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    units = root / "etc/systemd/system"
    first = install("head")
    assert "not started yet: diffusiond-ray-head.service diffusiond-cluster.service" in first
    assert "DIFFUSIOND_RAY_HEAD and DIFFUSIOND_RAY_IP in" in first
    token = root / "etc/diffusiond/ray-token"
    assert re.fullmatch("[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o777 == 0o600
    head = (units / "diffusiond-ray-head.service").read_text()
    assert "ExecStart=/opt/d2/venv/bin/ray start --block --head" in head and "ReadWritePaths=/srv/spool\n" in head
    driver = (units / "diffusiond-cluster.service").read_text()
    assert "ExecStart=/opt/d2/venv/bin/diffusiond cluster" in driver
    assert not (units / "diffusiond-ray-node.service").exists()
    env = root / "etc/diffusiond/cluster.env"
    assert "DIFFUSIOND_RAY_HEAD=\n" in env.read_text()

    # A node without the token: not started, says where it comes from.
    token.rename(tmp_path / "token")
    env.write_text("DIFFUSIOND_RAY_HEAD=10.0.0.1:6379\nDIFFUSIOND_RAY_IP=10.0.0.2\n")
    assert "copy the cluster's token from the head's" in install("node")
    # Filled in, with the token: ready to enable (systemd does not run in a scratch root).
    (tmp_path / "token").rename(token)
    token.chmod(0o644)  # copied without care: the install makes it the service user's alone again
    second = install("node")
    assert token.stat().st_mode & 0o777 == 0o600
    assert "not started" not in second
    assert "systemctl enable --now diffusiond-ray-node.service" in second
    assert "--address=${DIFFUSIOND_RAY_HEAD}" in (units / "diffusiond-ray-node.service").read_text()
    assert env.read_text().startswith("DIFFUSIOND_RAY_HEAD=10.0.0.1:6379")  # kept

    wrong = subprocess.run([script, *common, "--cluster", "gpu"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--cluster: head or node" in wrong.stderr
    gone = subprocess.run([script, "--root", str(root), "--uninstall"], capture_output=True, text=True)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not list(units.glob("diffusiond*")) and env.exists()


def test_install_script_lints() -> None:
    script = UNITS / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
