"""Logging: job fields reach the journal as fields; without a journal, stderr keeps its format.

Three ways to the journal, from most to least available:
- the handler's own `send` call, captured (needs python-systemd only);
- libsystemd writing to a journal socket we bind ourselves at the standard path, inside a private
  mount namespace (needs root and `unshare`; libsystemd has no way to name another socket);
- the real journald, read back with `journalctl`'s library (needs a running journald).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest

from diffusiond.daemon.journal import JOURNAL_SOCKET, job_fields
from tests.conftest import CEILING_S

FIELDS = {"JOB_ID": "hamster-1", "JOB_FILE": "hamster.yaml", "TASK": "txt2img", "MODEL": "sd15"}


def _python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in (env or os.environ).items() if k != "JOURNAL_STREAM"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=CEILING_S, env=env
    )


def test_job_fields_are_journal_field_names_and_skip_unset_values() -> None:
    assert job_fields(job_id="hamster-1", job_file="hamster.yaml", task="txt2img", model="sd15") == FIELDS
    assert job_fields(job_id="a", model=None) == {"JOB_ID": "a"}


def test_stderr_keeps_its_format_with_job_fields() -> None:
    run = _python(
        """
        import logging
        from diffusiond.daemon.journal import job_fields, setup_logging
        print(setup_logging("INFO"))
        logging.getLogger("diffusiond.daemon.worker").info(
            "done %s", "hamster-1", extra=job_fields(job_id="hamster-1", job_file="hamster.yaml", task="txt2img")
        )
        """
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "stderr"
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].endswith(" INFO diffusiond.daemon.worker: done hamster-1")


def test_under_systemd_without_a_journal_handler_stderr_carries_priorities_and_says_what_to_do() -> None:
    """`JOURNAL_STREAM` is our stderr, but no journal socket or no python-systemd: stderr with `<N>` prefixes."""
    run = _python(
        """
        import logging, os, unittest.mock
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        from diffusiond.daemon import journal
        with unittest.mock.patch.object(journal, "JOURNAL_SOCKET", "/nonexistent/journal/socket"):
            print(journal.setup_logging("INFO"))
        logging.getLogger("x").error("failed %s", "j1", extra=journal.job_fields(job_id="j1"))
        """
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "stderr"
    warning, error = run.stderr.splitlines()
    assert warning.startswith("<4>WARNING diffusiond.daemon.journal: logging to stderr, without journal fields")
    assert "no journal socket at /nonexistent/journal/socket" in warning
    assert error == "<3>ERROR x: failed j1"


def test_journal_handler_sends_job_fields() -> None:
    """python-systemd's JournalHandler passes every record attribute to `send`; our extras are among them."""
    journal = pytest.importorskip("systemd.journal", reason="python-systemd not installed: pip install '.[systemd]'")
    import logging

    sent: list[tuple[str, dict[str, Any]]] = []

    def send(message: str, /, **fields: Any) -> None:  # positional: the record's own `message` is a field too
        sent.append((message, fields))

    handler = journal.JournalHandler(sender_function=send)
    logger = logging.getLogger("test_journal.capture")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("rejected %s", "hamster.yaml", extra=job_fields(job_id="hamster-1", job_file="hamster.yaml"))
    finally:
        logger.removeHandler(handler)
    [(message, fields)] = sent
    assert message == "rejected hamster.yaml"
    assert fields["JOB_ID"] == "hamster-1" and fields["JOB_FILE"] == "hamster.yaml"
    assert fields["PRIORITY"] == "4"


# Runs inside a private mount namespace with a tmpfs on /run: binds the journal socket itself,
# logs through setup_logging (which must choose the journal), prints the datagram's fields.
_NAMESPACE_SCRIPT = """
import json, logging, os, socket
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.settimeout(10)
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from diffusiond.daemon.journal import job_fields, setup_logging
chosen = setup_logging("INFO")
fields = job_fields(job_id="hamster-1", job_file="hamster.yaml", task="txt2img", model="sd15")
logging.getLogger("diffusiond.daemon.worker").info("done %s", "hamster-1", extra=fields)
data, received = sock.recv(1 << 20), {}
while data:  # the native protocol: KEY=value\\n, or KEY\\n<le64 size><bytes>\\n for values with newlines
    line, _, rest = data.partition(b"\\n")
    if b"=" in line:
        key, _, value = line.partition(b"=")
        data = rest
    else:
        key, size = line, int.from_bytes(rest[:8], "little")
        value, data = rest[8 : 8 + size], rest[8 + size + 1 :]
    received[key.decode()] = value.decode()
print(json.dumps({"chosen": chosen, "fields": received}))
"""


def test_job_fields_reach_a_journal_socket_through_libsystemd() -> None:
    pytest.importorskip("systemd.journal", reason="python-systemd not installed: pip install '.[systemd]'")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare, to bind a journal socket at the standard path in a private namespace")
    private = ["unshare", "--mount", "--propagation", "private"]
    if subprocess.run([*private, "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here (no CAP_SYS_ADMIN)")
    setup = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec "$0" -c "$1"'
    run = subprocess.run(
        [*private, "sh", "-c", setup, sys.executable, _NAMESPACE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["chosen"] == "journal"
    fields = result["fields"]
    assert {k: fields.get(k) for k in FIELDS} == FIELDS
    assert fields["MESSAGE"] == "done hamster-1"
    assert fields["SYSLOG_IDENTIFIER"] == "diffusiond"
    assert fields["PRIORITY"] == "6"


@pytest.mark.skipif(not os.path.exists(JOURNAL_SOCKET), reason=f"no journal socket at {JOURNAL_SOCKET}")
def test_job_fields_reach_journald() -> None:
    journal = pytest.importorskip("systemd.journal", reason="python-systemd not installed: pip install '.[systemd]'")
    job_id = f"test-{uuid.uuid4().hex}"
    run = _python(
        f"""
        import logging
        from diffusiond.daemon.journal import job_fields, setup_logging
        assert setup_logging("INFO", target="journal") == "journal"
        logging.getLogger("x").info("done", extra=job_fields(job_id="{job_id}", task="txt2img", model="sd15"))
        """
    )
    assert run.returncode == 0, run.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reader = journal.Reader()
        reader.add_match(JOB_ID=job_id)
        entries = list(reader)
        reader.close()
        if entries:
            assert (entries[0]["MESSAGE"], entries[0]["SYSLOG_IDENTIFIER"]) == ("done", "diffusiond")
            assert (entries[0]["TASK"], entries[0]["MODEL"]) == ("txt2img", "sd15")
            return
        time.sleep(0.2)
    pytest.fail(f"no journal entry with JOB_ID={job_id} after 10 s (can this user read the journal?)")
