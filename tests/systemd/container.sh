#!/usr/bin/env bash
# A throwaway container that runs this machine's own systemd as PID 1, for tests that need a real
# service manager (unit hardening, sd_notify, the watchdog, IPAddressDeny=, DeviceAllow=, ...).
#
#   container.sh start NAME       boot; wait for "running" or "degraded"; print the container's PID 1
#   container.sh exec NAME CMD... run CMD inside (nsenter into every namespace of its PID 1)
#   container.sh stop NAME        power off, wait, kill what is left, remove cgroups and state
#   container.sh check-clean [NAME]  exit 1 and list what any container (or NAME) left on the host
#
# Root is an overlay of / (upper and work dirs on a tmpfs), mounted in a private mount namespace
# that dies with systemd-nspawn: the host never sees the mounts, and all writes vanish on stop.
# What stays on the host while a container runs: two cgroups (/sys/fs/cgroup/{unified,systemd}/
# diffusiond-ct-NAME) and a state dir on a tmpfs (/dev/shm/diffusiond-ct/NAME: launcher pid, log).
# Needs root and `systemd-nspawn` (Debian: apt-get install --no-install-recommends systemd-container).
# Environment: CT_BOOT_TIMEOUT (s, default 60), CT_STOP_TIMEOUT (s, default 30).
set -euo pipefail

PREFIX=diffusiond-ct
STATE_ROOT=/dev/shm/$PREFIX
CGROOT_V2=/sys/fs/cgroup/unified
CGROOT_NAMED=/sys/fs/cgroup/systemd
BOOT_TIMEOUT=${CT_BOOT_TIMEOUT:-60}
STOP_TIMEOUT=${CT_STOP_TIMEOUT:-30}
CT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SELF=$(readlink -f "$0")

die() { echo "container.sh: $*" >&2; exit 1; }
log() { echo "container.sh: $*" >&2; }
since() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }

check_name() {
    [[ ${1:-} =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "bad NAME '${1:-}' (want [a-z0-9][a-z0-9-]{0,30})"
}

# Every pid in the container's cgroups (both hierarchies), launcher included.
cg_pids() {
    local d
    for d in "$CGROOT_V2/$PREFIX-$1" "$CGROOT_NAMED/$PREFIX-$1"; do
        [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -un
}

# Every pid, zombies included, that is or was in the container's v2 cgroup.
ref_pids() {
    grep -ls "^0::/$PREFIX-$1\([/ ]\|\$\)" /proc/[0-9]*/cgroup | cut -d/ -f3
}

# The container's PID 1 as the host sees it: the process in our cgroups that is pid 1 of a
# child pid namespace ("NSpid: <host pid> 1").
leader_pid() {
    local p
    for p in $(cg_pids "$1"); do
        if awk '/^NSpid:/ { found = (NF == 3 && $3 == 1) } END { exit !found }' \
            "/proc/$p/status" 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# The launcher (one pid: a subshell, then setsid, unshare, the inner shell and systemd-nspawn, each
# exec'ing the next): the processes in our cgroups whose parent is not.
cg_roots() {
    local all p pp
    all=" $(cg_pids "$1" | tr '\n' ' ') "
    for p in $all; do
        pp=$(awk '/^PPid:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || continue
        [[ $all == *" $pp "* ]] || echo "$p"
    done
}

# Runs as the launcher, inside the private mount namespace: mounts, then exec systemd-nspawn.
inner() {
    local name=$1 st=$STATE_ROOT/$1 mnt root u
    grep -qs "^0::/$PREFIX-$name\$" /proc/self/cgroup || { echo "_inner: not in our cgroup" >&2; exit 1; }
    mnt=$st/mnt
    root=$mnt/root
    mount -t tmpfs -o mode=0700,size=2g "$PREFIX-$name" "$mnt"
    mkdir "$mnt/upper" "$mnt/work" "$root"
    mount -t overlay "$PREFIX-$name" -o "lowerdir=/,upperdir=$mnt/upper,workdir=$mnt/work" "$root"
    # /run is on the root disk here: nspawn keeps state under /run/systemd/nspawn and refuses to
    # clean state it finds on disk. A tmpfs there, seen only in this namespace.
    mount -t tmpfs -o mode=0755 "$PREFIX-$name" /run/systemd
    # The container's own identity and a quiet boot: no timers, no clock sync, no database.
    u=$(</proc/sys/kernel/random/uuid)
    echo "${u//-/}" >"$root/etc/machine-id"
    echo "$name" >"$root/etc/hostname"
    for u in "$root"/lib/systemd/system/*.timer "$root"/etc/systemd/system/timers.target.wants/* \
        "$root"/lib/systemd/system/systemd-timesyncd.service \
        "$root"/lib/systemd/system/postgresql*.service; do
        [ -e "$u" ] || continue
        ln -sfn /dev/null "$root/etc/systemd/system/${u##*/}"
    done
    rm -rf "$root/etc/systemd/system/timers.target.wants"
    # Pure cgroup v2 inside (device and IP filters are BPF programs on v2 only); bpf() allowed,
    # else systemd silently skips IPAddressDeny=; keep our cgroups, register with no machined.
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec systemd-nspawn \
        --directory="$root" --machine="$name" --boot \
        --register=no --keep-unit --private-network --system-call-filter=bpf \
        --link-journal=no --resolv-conf=off --timezone=off --console=read-only
}

# Idempotent: works on a half-started, running, or already-dead container.
teardown() {
    local name=$1 st=$STATE_ROOT/$1 p t d
    # nspawn turns each SIGTERM into SIGRTMIN+3 for the container's systemd: an orderly poweroff.
    # (Before the exec, the launcher simply ends.) Repeated each second: a signal that reaches
    # systemd before it has installed its handlers is dropped by the kernel.
    t=0
    while [ -n "$(cg_pids "$name")" ] && [ $t -lt $((STOP_TIMEOUT * 10)) ]; do
        if [ $((t % 10)) = 0 ]; then
            for p in $(cg_roots "$name"); do kill -TERM "$p" 2>/dev/null || true; done
        fi
        sleep 0.1
        t=$((t + 1))
    done
    # Whatever is left: SIGKILL, the payload first so that nspawn reaps the container's PID 1
    # (killed in the other order, that PID 1 would be left to the host's init to reap).
    t=0
    while [ -n "$(cg_pids "$name")" ] && [ $t -lt 50 ]; do
        [ $t = 0 ] && log "$name: no poweroff within ${STOP_TIMEOUT}s, killing"
        d=$CGROOT_V2/$PREFIX-$name/payload
        if [ $t -lt 10 ] && [ -e "$d/cgroup.kill" ] && [ -n "$(find "$d" -name cgroup.procs -exec cat {} +)" ]; then
            echo 1 >"$d/cgroup.kill"
        else
            for p in $(cg_pids "$name"); do kill -KILL "$p" 2>/dev/null || true; done
        fi
        sleep 0.1
        t=$((t + 1))
    done
    [ -z "$(cg_pids "$name")" ] || log "$name: processes survive SIGKILL: $(cg_pids "$name" | tr '\n' ' ')"
    # A dead process leaves cgroup.procs at once but stays a zombie until its parent reaps it: this
    # script, nspawn, or for orphans the host's init (which here takes up to a few seconds).
    t=0
    while [ -n "$(ref_pids "$name")" ] && [ $t -lt 100 ]; do sleep 0.1; t=$((t + 1)); done
    [ -z "$(ref_pids "$name")" ] || log "$name: not reaped yet: $(ref_pids "$name" | tr '\n' ' ')"
    for d in "$CGROOT_V2/$PREFIX-$name" "$CGROOT_NAMED/$PREFIX-$name"; do
        if [ -d "$d" ]; then
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || log "$name: cannot remove cgroup $d"
        fi
    done
    if [ -d "$st" ]; then
        if mountpoint -q "$st/mnt"; then
            log "$name: $st/mnt is mounted on the host; not removing $st"
        else
            rm -rf --one-file-system "$st"
        fi
    fi
    rmdir "$STATE_ROOT" 2>/dev/null || true
}

start() {
    local name=$1 st=$STATE_ROOT/$1 lp pid state t0 t
    command -v systemd-nspawn >/dev/null ||
        die "no systemd-nspawn: apt-get install -y --no-install-recommends systemd-container"
    if [ -e "$st" ] || [ -e "$CGROOT_V2/$PREFIX-$name" ] || [ -e "$CGROOT_NAMED/$PREFIX-$name" ]; then
        die "$name exists (or was left behind): container.sh stop $name"
    fi
    t0=$(date +%s%N)
    # From here on any failure or signal tears the half-built container down again.
    trap 'teardown "$name"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    [ -d "$STATE_ROOT" ] || mkdir -m 0700 "$STATE_ROOT"
    mkdir -m 0700 "$st" "$st/mnt"
    mkdir "$CGROOT_V2/$PREFIX-$name" "$CGROOT_NAMED/$PREFIX-$name"
    # The launcher puts itself into our cgroups before it does anything else; everything it starts
    # inherits them. setsid: a Ctrl-C on this terminal reaches this script (which tears down), not
    # nspawn. (No fork: setsid and unshare exec; a background subshell leads no process group.)
    (
        echo "$BASHPID" >"$CGROOT_V2/$PREFIX-$name/cgroup.procs"
        echo "$BASHPID" >"$CGROOT_NAMED/$PREFIX-$name/cgroup.procs"
        exec setsid unshare --mount --propagation private -- "$SELF" _inner "$name"
    ) </dev/null >"$st/console.log" 2>&1 &
    lp=$!
    while [ -z "$(cg_pids "$name")" ] && kill -0 "$lp" 2>/dev/null; do sleep 0.01; done
    t=$((BOOT_TIMEOUT * 10))
    while :; do
        [ -n "$(cg_roots "$name")" ] || {
            sed 's/^/  | /' "$st/console.log" >&2
            die "$name: the launcher ended during boot (log above)"
        }
        [ $t -gt 0 ] || {
            tail -n 30 "$st/console.log" | sed 's/^/  | /' >&2
            die "$name: not booted within ${BOOT_TIMEOUT}s (last state: ${state:-none})"
        }
        if pid=$(leader_pid "$name"); then
            state=$(nsenter -t "$pid" -a -r -w env -i PATH="$CT_PATH" \
                systemctl is-system-running 2>/dev/null) || true
            case $state in running | degraded) break ;; esac
        fi
        sleep 0.1
        t=$((t - 1))
    done
    trap - EXIT INT TERM HUP
    log "$name: $state after $(since "$t0") s"
    echo "$pid"
}

stop() {
    local t0
    t0=$(date +%s%N)
    teardown "$1"
    log "$1: stopped after $(since "$t0") s"
}

cexec() {
    local name=$1 pid
    shift
    [ $# -gt 0 ] || die "exec: no command"
    pid=$(leader_pid "$name") || die "$name is not running"
    exec nsenter -t "$pid" -a -r -w env -i PATH="$CT_PATH" LANG=C.UTF-8 TERM="${TERM:-dumb}" "$@"
}

# check_clean [NAME]: what any container (or only NAME) left on the host.
check_clean() {
    local bad=0 p d m tag=$PREFIX- files=$STATE_ROOT who=${1:+$1 }
    if [ -n "${1:-}" ]; then
        tag=$PREFIX-$1
        files=$STATE_ROOT/$1
    fi
    for p in /proc/[0-9]*; do
        if grep -qs -e ":/$tag\$" -e ":/$tag/" "$p/cgroup" || { [ "$tag" = "$PREFIX-" ] && grep -qs ":/$tag" "$p/cgroup"; } ||
            tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -e "^[^ ]*bash [^ ]*container\.sh _inner $who" \
                -e "^unshare --mount .*container\.sh _inner $who" -e "^systemd-nspawn .*--machine=$who"; then
            echo "process: ${p#/proc/} ($(awk '/^State:/ { print $2 }' "$p/status" 2>/dev/null))" \
                "$(tr '\0' ' ' 2>/dev/null <"$p/cmdline" | cut -c1-110)"
            bad=1
        fi
    done
    for d in /sys/fs/cgroup/*/"$tag"*; do
        [ -e "$d" ] || continue
        [ "$tag" = "$PREFIX-" ] || [ "${d##*/}" = "$tag" ] || continue
        echo "cgroup: $d"
        bad=1
    done
    while read -r m; do
        echo "mount: $m"
        bad=1
    done < <(awk -v p="$tag" '$5 ~ p || $0 ~ (" " p)' /proc/self/mountinfo)
    [ -e "$files" ] && { echo "files: $files ($(find "$files" | wc -l) entries)"; bad=1; }
    for d in /sys/class/net/ve-* /sys/class/net/vb-*; do
        [ -e "$d" ] && { echo "network: ${d##*/}"; bad=1; }
    done
    [ $bad = 0 ] && echo "clean"
    return $bad
}

[ "$(id -u)" = 0 ] || die "needs root"
case ${1:-} in
    start) check_name "${2:-}"; start "$2" ;;
    exec) check_name "${2:-}"; shift; cexec "$@" ;;
    stop) check_name "${2:-}"; stop "$2" ;;
    check-clean) [ -z "${2:-}" ] || check_name "$2"; check_clean "${2:-}" ;;
    _inner) inner "$2" ;;
    *) die "usage: container.sh start NAME | exec NAME CMD... | stop NAME | check-clean [NAME]" ;;
esac
