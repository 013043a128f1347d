#!/usr/bin/env bash
# The service under a real systemd (issue 14, first checks): install diffusiond into a throwaway
# container exactly as README tells an operator (systemd/install.sh), then check it through
# systemctl and journalctl. Prints one line per check and a closing `N passed, N failed`.
#
#   sudo tests/systemd/run.sh          # needs root and systemd-nspawn (see README.md here)
#
# WORK IN PROGRESS (2026-12-01): not run by .ci/run; the issue's full list of checks is not written,
# and two findings are worked around here (marked "Found:"). Leaves nothing behind: the container is
# stopped and `container.sh check-clean` run on any exit.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
ct="$here/container.sh"
name=svc-$$
passed=0
failed=0

if [[ $(id -u) != 0 ]] || ! command -v systemd-nspawn >/dev/null; then
    echo "skipped: needs root and systemd-nspawn (apt-get install --no-install-recommends systemd-container)"
    exit 0
fi

teardown() {
    "$ct" stop "$name" >/dev/null 2>&1
    if ! "$ct" check-clean >/dev/null; then
        echo "FAIL  leftovers on the host after the run:"
        "$ct" check-clean
        failed=$((failed + 1))
    fi
    echo "$passed passed, $failed failed"
    [[ $failed == 0 ]]
}
trap 'teardown; exit $?' EXIT

check() { # check DESCRIPTION COMMAND...: one line, counted
    local what=$1
    shift
    local out
    if out=$("$@" 2>&1); then
        echo "ok    $what"
        passed=$((passed + 1))
    else
        echo "FAIL  $what"
        while IFS= read -r line; do echo "      $line"; done <<<"$out" | tail -15
        failed=$((failed + 1))
    fi
}

in_ct() { "$ct" exec "$name" "$@"; }

wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

pid=$("$ct" start "$name" | tail -1) || exit 1

# The install keeps the host's network (pip needs an index; the container has none), and writes
# only into the container's overlay: mount, UTS, IPC and PID namespaces are the container's.
install() {
    nsenter -t "$pid" -m -u -i -p env TORCH=torch==2.13.0 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        "$repo/systemd/install.sh"
}
check "systemd/install.sh installs and starts diffusiond.service" install

active() { [[ $(in_ct systemctl is-active diffusiond) == active ]]; }
check "the unit is active" wait_for 120 active

status_idle() { in_ct systemctl show -p StatusText --value diffusiond | grep '^idle, watching ' >/dev/null; }
check "systemctl status shows the daemon's STATUS line: idle, watching the inbox" wait_for 60 status_idle

security() {
    local level
    level=$(in_ct systemd-analyze security diffusiond | sed -n 's/.*Overall exposure level for diffusiond.service: \([0-9.]*\).*/\1/p')
    echo "exposure $level"
    awk -v l="$level" 'BEGIN { exit !(l != "" && l <= 0.7) }'
}
check "systemd-analyze security stays at or below 0.7" security

# A job on the tiny test model, under the service user: the model and config change, then a reload.
spool=/var/lib/diffusiond/spool
setup_model() {
    # Found: make-test-model leaves its model folders 0700 (root's), so the service user cannot read
    # them, and the daemon then says "no usable model_index.json", not "permission denied". Issue 14.
    in_ct /opt/diffusiond/venv/bin/diffusiond make-test-model /var/lib/diffusiond/models/test &&
        in_ct chmod -R a+rX /var/lib/diffusiond/models &&
        in_ct sh -c 'printf "models: {test: /var/lib/diffusiond/models/test/sd}\ndefaults: {all: {model: test, size: 64x64, steps: 2}}\n" >> /etc/diffusiond/config.yaml' &&
        in_ct systemctl reload diffusiond
}
check "systemctl reload with a new model in the config" setup_model
check "the unit stays active after the reload" active

job() {
    in_ct sh -c "printf 'prompt: a lighthouse\nseed: 3\n' > $spool/inbox/.light.part && mv $spool/inbox/.light.part $spool/inbox/light.yaml" &&
        wait_for 300 in_ct sh -c "ls $spool/outbox/light-*.json" &&
        in_ct sh -c "stat -c %U $spool/outbox/light-*.json | grep -qx diffusiond" &&
        in_ct sh -c "test -e $spool/archive/light.yaml"
}
check "a job runs under the service user: manifest in the outbox, input archived" job

# Found: on systemd 252 `systemctl reload` returns once ExecReload's SIGHUP is sent, before the
# daemon has read the config (its RELOADING=1/READY=1 are waited for only by Type=notify-reload,
# systemd 253+), and it exits 0 for a config the daemon refuses: the journal line is what says so.
# So the broken config stays in place until that line is there.
broken_reload() {
    in_ct sh -c 'cp /etc/diffusiond/config.yaml /tmp/good.yaml && echo "device: warp-drive" >> /etc/diffusiond/config.yaml' &&
        in_ct systemctl reload diffusiond
    local reloaded=$?
    wait_for 60 refused
    local said=$?
    in_ct cp /tmp/good.yaml /etc/diffusiond/config.yaml
    echo "systemctl reload exit $reloaded; the journal says it refused: $([[ $said == 0 ]] && echo yes || echo no)"
    [[ $reloaded == 0 && $said == 0 ]] && active
}
# grep without -q reads to the end: with -q, journalctl would die of SIGPIPE and pipefail fail the check.
refused() { in_ct journalctl -u diffusiond --no-pager -o cat | grep 'config reload refused' >/dev/null; }
check "a broken config on reload is refused, the unit stays active, the journal says why" broken_reload

stop_clean() {
    in_ct systemctl stop diffusiond &&
        [[ $(in_ct systemctl show -p Result --value diffusiond) == success ]] &&
        [[ $(in_ct systemctl is-active diffusiond) == inactive ]]
}
check "systemctl stop exits cleanly (Result=success)" stop_clean

uninstall() {
    nsenter -t "$pid" -m -u -i -p env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$repo/systemd/install.sh" --uninstall &&
        in_ct test -e /etc/diffusiond/config.yaml && in_ct test -e "$spool/archive/light.yaml" &&
        ! in_ct test -e /opt/diffusiond/venv
}
check "uninstall removes the venv and keeps config and spool" uninstall
