#!/usr/bin/env bash
# The service under a real systemd: install diffusiond into a throwaway container exactly as README
# tells an operator (systemd/install.sh), then check it through systemctl and journalctl. One line per
# check, and a closing `N passed, N failed`; exit 0 only when every check passed.
#
#   sudo tests/systemd/run.sh          # needs root and systemd-nspawn (see README.md here)
#
# .ci/run runs it after the unit tests. The checks build on each other (the model the reload adds,
# the job the stop interrupts), so they run in order. Nothing is left behind: the container is
# stopped and `container.sh check-clean` run on any exit, a failed check or a signal included.
# Environment: TORCH (the torch requirement install.sh installs; default torch==2.13.0, the CPU build).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
ct="$here/container.sh"
name=svc-$$
passed=0
failed=0
started=$SECONDS

if [[ $(id -u) != 0 ]] || ! command -v systemd-nspawn >/dev/null; then
    echo "skipped: the real-systemd checks need root and systemd-nspawn (apt-get install --no-install-recommends systemd-container)"
    exit 0
fi

teardown() {
    if [[ $failed != 0 ]] && "$ct" exec "$name" true 2>/dev/null; then
        echo "--- the journal's last lines for diffusiond*, for the failures above:"
        "$ct" exec "$name" journalctl -u 'diffusiond*' --no-pager -n 60 -o short-monotonic 2>&1 | sed 's/^/  | /'
    fi
    "$ct" stop "$name" >/dev/null 2>&1
    if ! "$ct" check-clean "$name" >/dev/null; then
        echo "FAIL  leftovers on the host after the run:"
        "$ct" check-clean "$name"
        failed=$((failed + 1))
    fi
    echo "$passed passed, $failed failed ($((SECONDS - started)) s)"
    [[ $failed == 0 ]]
}
trap 'teardown; exit $?' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check() { # check DESCRIPTION COMMAND...: one line, counted; the command's output shown when it fails
    local what=$1
    shift
    local out
    if out=$("$@" 2>&1); then
        echo "ok    $what"
        passed=$((passed + 1))
    else
        echo "FAIL  $what"
        while IFS= read -r line; do echo "      $line"; done <<<"$out" | tail -20
        failed=$((failed + 1))
    fi
}

in_ct() { "$ct" exec "$name" "$@"; }
show() { in_ct systemctl show -p "$1" --value "${2:-diffusiond}"; }
journal() { in_ct journalctl -u "${1:-diffusiond}" --no-pager -o cat; }
# grep without -q reads to the end: with -q, journalctl would die of SIGPIPE and pipefail fail the check.
said() { journal "${2:-diffusiond}" | grep -e "$1" >/dev/null; }

wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds (the limit only stops a hung check)
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

pid=$("$ct" start "$name" | tail -1) || exit 1

src=/opt/diffusiond-src
spool=/var/lib/diffusiond/spool
state=/var/lib/diffusiond/state
config=/etc/diffusiond/config.yaml
venv=/opt/diffusiond/venv

drop() { # drop NAME CONTENT: a job file into the inbox, whole (written beside it, renamed in)
    in_ct sh -c "printf '%s' \"\$2\" > $spool/inbox/.\$1.part && mv $spool/inbox/.\$1.part $spool/inbox/\$1" - "$1" "$2"
}
manifest_of() { in_ct sh -c "ls $spool/outbox/$1-*.json" | grep -v '\.error\.' | head -1; }

# --- Install ------------------------------------------------------------------------------------
# The checkout, copied into the container (its tracked and unignored files): the container's root is
# an overlay of the host's / alone, which does not show a checkout on another mount.
copy_checkout() {
    if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -C "$repo" --null -T - -cf -
    else
        tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./demo --exclude='*cache' -cf - .
    fi | in_ct sh -c "mkdir -p $src && tar -C $src -xf -"
}
check "the checkout copied into the container" copy_checkout

# In the container's mount, UTS, IPC and PID namespaces, with the host's network (pip needs an index;
# the container has none): it writes only into the container's overlay.
into_ct() { nsenter -t "$pid" -m -u -i -p env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

hidden_python() {
    # Found: a pyenv Python under /root made a venv the service cannot run (ProtectHome=yes: 203/EXEC).
    # A copy of the system's Python under /root stands for it (inside the container only).
    into_ct sh -c 'mkdir -p /root/pyenv-like && cp /usr/bin/python3 /root/pyenv-like/python3' || return 1
    local out rc
    out=$(into_ct env PYTHON=/root/pyenv-like/python3 "$src/systemd/install.sh" --dry-run 2>&1)
    rc=$?
    echo "exit $rc: $out"
    [[ $rc != 0 && $out == *"which the service cannot see (ProtectHome=yes)"* ]]
}
check "install.sh refuses a Python under /root or /home (the service could not run it)" hidden_python

install_log=/dev/shm/diffusiond-svc-install.$$
install() {
    into_ct env TORCH="${TORCH:-torch==2.13.0}" "$src/systemd/install.sh" >"$install_log" 2>&1
    local rc=$?
    cat "$install_log"
    [[ $rc == 0 ]] && grep -e "from /usr/bin/python3" "$install_log" >/dev/null
}
check "systemd/install.sh installs and starts diffusiond.service (venv from /usr/bin/python3)" install
journal_extra() {
    cat "$install_log"
    grep -e "with the journal extra" "$install_log" >/dev/null && in_ct "$venv/bin/python" -c "import systemd.journal"
}
check "install.sh installed the journal extra (systemd-python built here)" journal_extra
rm -f "$install_log"

active() { [[ $(in_ct systemctl is-active "${1:-diffusiond}") == active ]]; }
check "the unit is active" wait_for 120 active

status_idle() { show StatusText | grep '^idle, watching ' >/dev/null; }
check "systemctl status shows the daemon's STATUS line: idle, watching the inbox" wait_for 60 status_idle

security() { # security UNIT: the exposure systemd-analyze gives, at or below today's 0.7
    local level
    level=$(in_ct systemd-analyze security "$1" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    echo "$1: exposure $level"
    awk -v l="$level" 'BEGIN { exit !(l != "" && l <= 0.7) }'
}
check "systemd-analyze security diffusiond stays at or below 0.7" security diffusiond.service

# --- A model, by reload; a job ----------------------------------------------------------------------
add_model() {
    # Found: make-test-model left its folders 0700 (root's): the service user could not read them, and
    # the daemon said "no usable model_index.json". No chmod here: the folders are readable now.
    in_ct "$venv/bin/diffusiond" make-test-model /var/lib/diffusiond/models/test >/dev/null &&
        in_ct sh -c "printf 'models: {test: /var/lib/diffusiond/models/test/sd}\ndefaults: {all: {model: test, size: 64x64, steps: 2}}\nlimits: {max_steps: 1000}\npreload: [test]\n' >> $config" &&
        in_ct systemctl reload diffusiond &&
        # Found: systemctl reload returned before the daemon had read the config. Now it returns after:
        # the daemon's answer is in its status when systemctl does.
        in_ct "$venv/bin/diffusiond" status --state-dir "$state" --json | grep -e '"ok": true' >/dev/null
}
check "systemctl reload with a new model returns once the daemon has taken the config" add_model
check "the unit stays active after the reload" active

job() {
    drop light.yaml $'prompt: a lighthouse\nseed: 3\nsteps: 4\n' &&
        wait_for 300 manifest_of light &&
        in_ct sh -c "stat -c %U $spool/outbox/light-*.json | grep -qx diffusiond" &&
        in_ct test -e "$spool/archive/light.yaml" &&
        in_ct sh -c "grep -q '\"steps\": 4' \$(ls $spool/outbox/light-*.json | head -1)"
}
check "a job runs under the service user: manifest in the outbox, owned by diffusiond, input archived" job

locked_model() {
    # Found: a model the service user could not read was reported as "no usable model_index.json".
    in_ct sh -c "cp -a /var/lib/diffusiond/models/test/sd /var/lib/diffusiond/models/locked && chmod 0600 /var/lib/diffusiond/models/locked/unet/*.safetensors" &&
        in_ct sh -c "sed -i 's#^models: {test: \\(.*\\)}#models: {test: \\1, locked: /var/lib/diffusiond/models/locked}#' $config" &&
        in_ct systemctl reload diffusiond &&
        drop locked.yaml $'prompt: from a locked model\nmodel: locked\n' &&
        wait_for 120 in_ct test -e "$spool/failed/locked.error.yaml" || return 1
    in_ct cat "$spool/failed/locked.error.yaml"
    in_ct "$venv/bin/python" -c '
import sys, yaml
report = yaml.safe_load(open(sys.argv[1]))
assert "cannot be read by diffusiond, the user the daemon runs as (permission denied)" in report["error"]
assert report["fix"].startswith("let it read the model: chmod -R a+rX /var/lib/diffusiond/models/locked")
' "$spool/failed/locked.error.yaml"
}
check "a model the service user cannot read fails its job with 'permission denied' and the chmod to run" locked_model

journal_fields() {
    local manifest id
    manifest=$(manifest_of light) || return 1
    id=$(in_ct python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["job_id"])' "$manifest")
    echo "job id: $id"
    in_ct journalctl -u diffusiond "JOB_ID=$id" -o json --no-pager | python3 -c '
import json, sys
lines = [json.loads(line) for line in sys.stdin]
for line in lines:
    print(line.get("MESSAGE"), {k: line.get(k) for k in ("JOB_FILE", "TASK", "MODEL")})
assert len(lines) >= 2, "want the job'"'"'s start and end lines"
assert all(line.get("JOB_FILE") == "light.yaml" for line in lines), "every line names the job file"
assert any(line.get("TASK") == "txt2img" and line.get("MODEL") == "test" for line in lines), "task and model"
'
}
check "journalctl -u diffusiond JOB_ID=<job_id> finds the job's lines with its fields" journal_fields

# --- Type=notify: activating until READY, the preload in STATUS -------------------------------------
preload_status() {
    # Restarted without waiting, watched until active: each distinct (state, STATUS) pair is printed.
    in_ct systemctl restart --no-block diffusiond || return 1
    # shellcheck disable=SC2016 # expanded inside the container
    in_ct sh -c 'last=""; end=$(($(date +%s) + 180)); while [ "$(date +%s)" -lt "$end" ]; do
        now=$(systemctl show -p ActiveState -p StatusText diffusiond | tr "\n" " ")
        [ "$now" = "$last" ] || { echo "$now"; last=$now; }
        case $now in *ActiveState=active*) exit 0 ;; *ActiveState=failed*) exit 1 ;; esac
    done; exit 1' >/dev/shm/diffusiond-svc-states.$$ || { cat /dev/shm/diffusiond-svc-states.$$; return 1; }
    cat /dev/shm/diffusiond-svc-states.$$
    grep -e 'StatusText=loading model test ActiveState=activating' /dev/shm/diffusiond-svc-states.$$ >/dev/null
    local rc=$?
    rm -f /dev/shm/diffusiond-svc-states.$$
    return $rc
}
check "Type=notify: activating while the preload runs (STATUS 'loading model test'), active after READY" preload_status

# --- STATUS during a job; stop during a job -----------------------------------------------------------
# 600 steps are 601 UNet calls with the test model's PNDM: progress counts the calls.
running_status() { show StatusText | grep -e '^running long.yaml (step [0-9]* of 601)' >/dev/null; }
status_running() {
    drop long.yaml $'prompt: a long one\nseed: 4\nsteps: 600\n' && wait_for 120 running_status && show StatusText
}
check "systemctl status shows the running job with its step" status_running

events() { in_ct sh -c "grep -c '\"event\": \"$1\".*\"source\": \"$2\"' $state/events.jsonl"; }
stop_during_job() {
    # Found: on SIGTERM the job put back in the inbox was claimed again before the daemon exited.
    in_ct systemctl stop diffusiond || return 1
    echo "Result=$(show Result) ExecMainStatus=$(show ExecMainStatus) claimed=$(events claimed long.yaml) released=$(events released long.yaml)"
    [[ $(show Result) == success && $(show ExecMainStatus) == 0 ]] &&
        in_ct test -e "$spool/inbox/long.yaml" && ! manifest_of long &&
        [[ $(events claimed long.yaml) == 1 && $(events released long.yaml) == 1 ]]
}
check "systemctl stop during a job: exit 0, the job back in the inbox, claimed once, put back once" stop_during_job

resumed_after_start() {
    in_ct systemctl start diffusiond && wait_for 600 manifest_of long && in_ct test -e "$spool/archive/long.yaml"
}
check "after systemctl start the job runs and lands in the outbox" resumed_after_start

# --- A broken config on reload -----------------------------------------------------------------------
broken_reload() {
    in_ct cp "$config" /tmp/good.yaml &&
        in_ct sh -c "echo 'device: warp-drive' >> $config" || return 1
    local out rc
    out=$(in_ct systemctl reload diffusiond 2>&1)
    rc=$?
    in_ct cp /tmp/good.yaml "$config"
    echo "systemctl reload: exit $rc: $out"
    show StatusText
    [[ $rc != 0 ]] && active && said 'config reload refused, keeping the running config' &&
        show StatusText | grep -e '^config reload refused: ' >/dev/null &&
        journal | grep -e 'diffusiond: config reload refused, the daemon keeps its running config: .*device' >/dev/null
}
check "a broken config on reload: systemctl reload fails, the unit stays active, status and journal say why" broken_reload

# --- The watchdog ------------------------------------------------------------------------------------
dropin=/etc/systemd/system/diffusiond.service.d
watchdog_dropin() {
    in_ct mkdir -p "$dropin" &&
        in_ct sh -c "printf '[Service]\nWatchdogSec=6\nRestartSec=1\n' > $dropin/50-test-watchdog.conf" &&
        in_ct systemctl daemon-reload && in_ct systemctl restart diffusiond && active
}
pings() { # pings N: systemd has seen N watchdog pings from one process, and restarted nothing
    local main seen=() stamp deadline=$((SECONDS + 120))
    main=$(show MainPID)
    while ((${#seen[@]} < $1)); do
        stamp=$(show WatchdogTimestampMonotonic)
        [[ $main -gt 1 && $(show MainPID) == "$main" && $(show NRestarts) == 0 ]] || return 1
        [[ " ${seen[*]:-} " == *" $stamp "* ]] || seen+=("$stamp")
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    echo "pings at ${seen[*]} (monotonic µs), MainPID $main, NRestarts 0"
}
idle_watchdog() { watchdog_dropin && pings 4; }
check "the watchdog (WatchdogSec=6 by a drop-in) leaves an idle daemon alone: pings arrive, no restart" idle_watchdog

hung=0
restarted() { [[ $(show NRestarts) == 1 && $(show MainPID) != "$hung" ]] && active; }
hung_watchdog() {
    hung=$(show MainPID)
    [[ $hung -gt 1 ]] || return 1 # (kill -STOP 0 would stop this script)
    in_ct kill -STOP "$hung" || return 1
    wait_for 120 restarted || { show NRestarts; return 1; }
    echo "MainPID $hung -> $(show MainPID)"
    said 'Watchdog timeout'
}
check "the watchdog restarts a hung daemon (SIGSTOP): Watchdog timeout, a new process, active" hung_watchdog
in_ct rm -f "$dropin/50-test-watchdog.conf"

# --- The sandbox, seen from inside the unit -----------------------------------------------------------
probed() { journal | grep -e '^diffusiond-probe ' >/dev/null; }
sandbox() {
    # The probe runs as ExecStartPost=, with every setting of the unit; then as the same user with none of
    # them. /dev/net/tun is made 0666 and an interface pair added (in the container), so that only the
    # sandbox can refuse them.
    in_ct sh -c "cp $src/tests/systemd/probe.py /usr/local/lib/diffusiond-probe.py && chmod 0666 /dev/net/tun" &&
        in_ct ip link add probe0 type veth peer name probe1 &&
        in_ct sh -c "printf '[Service]\nExecStartPost=/usr/bin/python3 /usr/local/lib/diffusiond-probe.py\n' > $dropin/50-test-probe.conf" &&
        in_ct systemctl daemon-reload && in_ct systemctl restart diffusiond || return 1
    in_ct rm -f "$dropin/50-test-probe.conf"
    in_ct systemctl daemon-reload
    wait_for 30 probed
    local inside outside
    inside=$(journal | grep '^diffusiond-probe ' | tail -1)
    outside=$(in_ct runuser -u diffusiond -- /usr/bin/python3 /usr/local/lib/diffusiond-probe.py)
    echo "in the unit: $inside"
    echo "outside:     $outside"
    python3 - "${inside#diffusiond-probe }" "${outside#diffusiond-probe }" <<'EOF'
import json, sys
inside, outside = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert inside["user"] == outside["user"] == "diffusiond" and int(inside["caps"], 16) == 0, "the user, no capabilities"
assert inside["net"] == ["lo"] and "probe0" in outside["net"], "no network but lo (PrivateNetwork)"
assert inside["inet"] == inside["inet6"] == "EAFNOSUPPORT" and outside["inet"] == "ok", "no IP sockets at all"
assert inside["tun"] == "EPERM" and outside["tun"] == "ok", "device policy: /dev/net/tun (0666) refused"
assert inside["null"] == "ok", "the standard pseudo-devices stay"
assert inside["write_usr"] == inside["write_etc"] == "EROFS", "read-only / (ProtectSystem=strict)"
assert inside["write_spool"] == "ok", "the spool is writable (ReadWritePaths)"
assert inside["home"] == inside["root"] == "EACCES" and outside["home"] == "ok", "/home and /root hidden (ProtectHome)"
EOF
}
check "the sandbox applies: service user, no caps, only lo, no IP sockets, /dev/net/tun refused, read-only /" sandbox

stop_clean() {
    in_ct systemctl stop diffusiond && [[ $(show Result) == success ]] && [[ $(in_ct systemctl is-active diffusiond) == inactive ]]
}
check "systemctl stop when idle exits cleanly (Result=success)" stop_clean

# --- The template unit --------------------------------------------------------------------------------
failed_for_good() { [[ $(show ActiveState diffusiond@0) == failed ]]; }
no_cuda() {
    # Found: diffusiond@N on a torch without CUDA restarted every 10 s. Now: exit 78, not restarted.
    in_ct systemctl start diffusiond@0
    local rc=$?
    wait_for 120 failed_for_good
    echo "systemctl start: exit $rc; $(in_ct systemctl show -p ActiveState -p SubState -p Result -p ExecMainStatus -p NRestarts diffusiond@0 | tr '\n' ' ')"
    journal diffusiond@0 | grep -e '^diffusiond: ' | tail -3
    [[ $rc != 0 && $(show SubState diffusiond@0) == failed && $(show ExecMainStatus diffusiond@0) == 78 ]] &&
        [[ $(show NRestarts diffusiond@0) == 0 ]] &&
        journal diffusiond@0 | grep -e "^diffusiond: .*no CUDA device.*Fix: diffusiond@N.service passes --device cuda:0" >/dev/null &&
        ! journal diffusiond@0 | grep -e '^Traceback' >/dev/null
}
check "diffusiond@0 on a machine without CUDA: one line with the fix, exit 78, failed, not restarted" no_cuda

instances() {
    in_ct mkdir -p /etc/systemd/system/diffusiond@.service.d &&
        in_ct sh -c "printf '[Service]\nExecStart=\nExecStart=$venv/bin/diffusiond run --config $config --device cpu --instance %%H-cpu%%i --state-dir /var/lib/diffusiond/gpu%%i\n' > /etc/systemd/system/diffusiond@.service.d/50-cpu.conf" &&
        in_ct systemctl daemon-reload && in_ct systemctl reset-failed diffusiond@0 &&
        in_ct systemctl start diffusiond@0 diffusiond@1 && active diffusiond@0 && active diffusiond@1 || return 1
    in_ct systemctl reload diffusiond@1 || return 1
    # Each instance alone on the spool in turn: the job it finds is its own.
    in_ct systemctl stop diffusiond@1 && drop zero.yaml $'prompt: for the first\nseed: 5\n' && wait_for 300 manifest_of zero &&
        in_ct systemctl start diffusiond@1 && in_ct systemctl stop diffusiond@0 &&
        drop one.yaml $'prompt: for the second\nseed: 6\n' && wait_for 300 manifest_of one || return 1
    local by0 by1
    by0=$(in_ct python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["instance"])' "$(manifest_of zero)")
    by1=$(in_ct python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["instance"])' "$(manifest_of one)")
    echo "zero.yaml by $by0, one.yaml by $by1"
    in_ct ls -d "$spool/work/$name-cpu0" "$spool/work/$name-cpu1" /var/lib/diffusiond/gpu0/status.json /var/lib/diffusiond/gpu1/status.json &&
        [[ $by0 == "$name-cpu0" && $by1 == "$name-cpu1" ]] &&
        in_ct grep -q '"state": "stopped"' /var/lib/diffusiond/gpu0/status.json &&
        in_ct grep -q '"state": "ready"' /var/lib/diffusiond/gpu1/status.json
}
check "the template runs two instances (CPU by a drop-in), each with its own work folder and state, reloadable" instances
check "systemd-analyze security diffusiond@0 stays at or below 0.7" security diffusiond@0.service

# --- A Ray cluster host ---------------------------------------------------------------------------
# This container is the whole cluster: the head with one logical GPU (a drop-in adds --num-gpus=1),
# on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else Ray rewrites it to the host's address),
# and the driver beside it. The slot runs the real test model in a Ray worker of the head's unit.
ray_as_service() { # a command as the service user, with the cluster's token and address
    in_ct runuser -u diffusiond -- env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/diffusiond/ray-token \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 HOME=/var/lib/diffusiond "$@"
}
cluster_log=/dev/shm/diffusiond-svc-cluster.$$
cluster_install() {
    in_ct systemctl stop diffusiond@0 diffusiond@1 diffusiond || return 1 # the slot alone on the spool
    into_ct env TORCH="${TORCH:-torch==2.13.0}" "$src/systemd/install.sh" --cluster head >"$cluster_log" 2>&1
    local rc=$?
    cat "$cluster_log"
    [[ $rc == 0 ]] && grep -e "not started yet: diffusiond-ray-head.service diffusiond-cluster.service" "$cluster_log" >/dev/null &&
        in_ct test -x "$venv/bin/ray" && [[ $(in_ct stat -c '%a %U' /etc/diffusiond/ray-token) == "600 diffusiond" ]] &&
        [[ $(in_ct systemctl is-active diffusiond-ray-head) != active ]]
}
check "install.sh --cluster head: the cluster extra, the units, a 0600 token; nothing started before cluster.env" cluster_install
rm -f "$cluster_log"

cluster_status() { ray_as_service "$venv/bin/diffusiond" cluster --config "$config" --address 127.0.0.1:6379 status; }
slot_ready() { cluster_status | grep -E '^gpu-00 .* ready '; }
cluster_start() {
    local dropins=/etc/systemd/system
    in_ct sh -c "printf 'DIFFUSIOND_RAY_HEAD=127.0.0.1:6379\nDIFFUSIOND_RAY_IP=127.0.0.1\n' > /etc/diffusiond/cluster.env" &&
        in_ct mkdir -p $dropins/diffusiond-ray-head.service.d $dropins/diffusiond-cluster.service.d &&
        in_ct sh -c "{ printf '[Service]\nEnvironment=RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\nExecStart=\n'; sed -n 's/^ExecStart=.*/& --num-gpus=1 --num-cpus=2/p' $dropins/diffusiond-ray-head.service; } > $dropins/diffusiond-ray-head.service.d/50-test.conf" &&
        in_ct sh -c "printf '[Service]\nEnvironment=RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n' > $dropins/diffusiond-cluster.service.d/50-test.conf" &&
        in_ct systemctl daemon-reload && in_ct systemctl enable --now diffusiond-ray-head diffusiond-cluster || return 1
    wait_for 300 slot_ready
    local rc=$?
    cluster_status
    in_ct systemctl show -p ActiveState -p SubState -p NRestarts diffusiond-ray-head diffusiond-cluster | tr '\n' ' '
    [[ $rc == 0 ]] && active diffusiond-ray-head && active diffusiond-cluster
}
check "the head and the driver start from cluster.env and the token; cluster status shows slot gpu-00 ready" cluster_start

slot_job() {
    drop ray.yaml $'prompt: a ray of light\nseed: 8\n' && wait_for 300 manifest_of ray || return 1
    local by
    by=$(in_ct python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["instance"])' "$(manifest_of ray)")
    echo "ray.yaml by $by"
    [[ $by == gpu-00 ]] && in_ct test -e "$spool/archive/ray.yaml" &&
        in_ct sh -c "stat -c %U $spool/outbox/ray-*.png | grep -qx diffusiond" &&
        in_ct test -s /var/lib/diffusiond/cluster/gpu-00/status.json
}
check "a job runs in the slot under the head's unit (real diffusers): manifest by gpu-00, owned by diffusiond" slot_job

slot_drained() {
    ray_as_service "$venv/bin/diffusiond" cluster --config "$config" --address 127.0.0.1:6379 drain gpu-00 || return 1
    # Past two of the driver's rounds (reconcile_s 5): it must not have placed the slot again.
    local until=$((SECONDS + 11)) out
    while ((SECONDS < until)); do sleep 1; done
    out=$(cluster_status) || return 1
    echo "$out"
    ! grep -e '^gpu-00' <<<"$out" >/dev/null && grep -e '^inbox: 0 files' <<<"$out" >/dev/null &&
        in_ct test -e "$spool/.cluster/drained/gpu-00.json"
}
check "cluster drain gpu-00 stops the slot and removes it; the driver does not place it again" slot_drained
cluster_stop() {
    # Stopped, still enabled: the uninstall below must disable and remove them.
    in_ct systemctl stop diffusiond-cluster diffusiond-ray-head || return 1
    in_ct systemctl show -p Result -p ExecMainStatus diffusiond-cluster diffusiond-ray-head | tr '\n' ' '
    # Found: with every process signalled at once, ray start's drain met a dead GCS (a traceback).
    ! journal diffusiond-ray-head | grep -e '^Traceback' >/dev/null &&
        [[ $(show Result diffusiond-ray-head) == success && $(show Result diffusiond-cluster) == success ]] &&
        in_ct systemctl start diffusiond@1 # for the uninstall below to stop
}
check "systemctl stop of the driver and the head: both exit cleanly, the head's drain without a traceback" cluster_stop

# --- Uninstall ---------------------------------------------------------------------------------------
uninstall() {
    into_ct "$src/systemd/install.sh" --uninstall &&
        in_ct test -e "$config" && in_ct test -e "$spool/archive/light.yaml" && ! in_ct test -e "$venv" &&
        [[ $(in_ct systemctl is-active diffusiond@1) != active ]] &&
        ! in_ct sh -c 'ls -d /etc/systemd/system/diffusiond-ray-* /etc/systemd/system/diffusiond-cluster.service*' 2>/dev/null &&
        [[ $(in_ct systemctl is-enabled diffusiond-ray-head 2>/dev/null) != enabled ]]
}
check "uninstall stops the instances, removes the venv, keeps config and spool" uninstall
