#!/usr/bin/env bash
# Install diffusiond as a system service (see README.md, "Running as a service"), or remove it.
#
#   sudo systemd/install.sh                     # venv in /opt/diffusiond, diffusiond.service
#   sudo systemd/install.sh --gpus 0,1          # one daemon per GPU: diffusiond@0, diffusiond@1
#   sudo systemd/install.sh --cluster head      # a Ray cluster's head: Ray head + the driver (README, "Several hosts")
#   sudo systemd/install.sh --cluster node      # a GPU host of that cluster: a Ray node, its GPUs slots
#   sudo systemd/install.sh --uninstall         # units, venv and snippets go; config, spool, user stay
#
# It installs this checkout into a venv (PREFIX/venv, torch from $TORCH or --torch), creates the
# user and group diffusiond (sysusers.d) and the folders (tmpfiles.d), writes
# /etc/diffusiond/config.yaml if there is none, installs the units into /etc/systemd/system and,
# where systemd runs, enables and starts them. Running it again updates everything but the config.
#
# --root DIR installs the files under DIR instead of / (staging, tests): nothing is started there,
# and --no-venv leaves the venv out. --dry-run prints the commands instead of running them.
#
# The venv's Python must be one the service can run: ProtectHome=yes hides /home, /root and
# /run/user, so a pyenv or conda interpreter there fails the unit with 203/EXEC. Without --python
# (or $PYTHON) the first of python3 on PATH and /usr/bin/python3 that is outside them is taken.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNITS_SRC="$SRC/systemd"
DEFAULT_PREFIX=/opt/diffusiond
DEFAULT_SPOOL=/var/lib/diffusiond/spool
PREFIX=$DEFAULT_PREFIX
SPOOL=$DEFAULT_SPOOL
ROOT=""
GPUS=""
CLUSTER=""
TORCH=${TORCH:-torch}
PYTHON=${PYTHON:-}
JOURNAL=auto
UNINSTALL=0
DRY_RUN=0
VENV=1

usage() {
    cat <<EOF
usage: $0 [--prefix DIR] [--spool DIR] [--gpus LIST|all | --cluster head|node] [--torch SPEC] [--python PATH]
          [--journal yes|no|auto] [--root DIR] [--no-venv] [--dry-run]
       $0 --uninstall [--prefix DIR] [--root DIR] [--dry-run]
  --prefix DIR   where the venv goes (DIR/venv; default $DEFAULT_PREFIX)
  --spool DIR    the shared spool (default $DEFAULT_SPOOL)
  --gpus LIST    one daemon per GPU: diffusiond@N for each N in LIST (0,1,...) or every /dev/nvidiaN
                 for 'all'; default: the single diffusiond.service
  --cluster ROLE a host of a Ray cluster (the cluster extra): 'head' runs diffusiond-ray-head and
                 diffusiond-cluster (the driver), 'node' diffusiond-ray-node; both need
                 /etc/diffusiond/cluster.env (written as a template) and /etc/diffusiond/ray-token
                 (made on the head, mode 0600; copy it to each node)
  --torch SPEC   the torch requirement pip installs first (default \$TORCH or 'torch')
  --python PATH  the interpreter for the venv (default \$PYTHON, else python3 on PATH or /usr/bin/python3:
                 the first outside /home, /root and /run/user, which the service cannot see)
  --journal WHEN the journal extra (systemd-python: JOB_ID=... fields in journalctl): yes, no, or
                 auto (default: yes where it builds: libsystemd-dev, pkg-config, a C compiler, Python.h)
  --root DIR     install under DIR instead of / (nothing is enabled or started)
  --no-venv      leave out the venv (it exists already, or a staging root)
  --dry-run      print the commands, change nothing
  --uninstall    stop and remove the units, the venv and the snippets; keep config, spool, state, user
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --spool) SPOOL=${2:?--spool needs a directory}; shift 2 ;;
        --gpus) GPUS=${2:?--gpus needs a list}; shift 2 ;;
        --cluster) CLUSTER=${2:?--cluster needs head or node}; shift 2 ;;
        --torch) TORCH=${2:?--torch needs a requirement}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --journal) JOURNAL=${2:?--journal needs yes, no or auto}; shift 2 ;;
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case $PREFIX$SPOOL in *'#'*) echo "paths with '#' are not supported" >&2; exit 2 ;; esac
case $PREFIX in /*) ;; *) echo "--prefix must be absolute" >&2; exit 2 ;; esac
case $JOURNAL in yes | no | auto) ;; *) echo "--journal: yes, no or auto, not '$JOURNAL'" >&2; exit 2 ;; esac
case $SPOOL in /*) ;; *) echo "--spool must be absolute" >&2; exit 2 ;; esac
case $CLUSTER in '' | head | node) ;; *) echo "--cluster: head or node, not '$CLUSTER'" >&2; exit 2 ;; esac
if [ -n "$CLUSTER" ] && [ -n "$GPUS" ]; then
    echo "--cluster and --gpus: a cluster's slots take every GPU of the host; give one of them" >&2
    exit 2
fi
if [ -n "$ROOT" ]; then
    ROOT=$(cd "$ROOT" && pwd)
fi
if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "run as root (or with --root DIR / --dry-run)" >&2
    exit 1
fi

UNIT_DIR=$ROOT/etc/systemd/system
SYSTEMD_RUNNING=0
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    SYSTEMD_RUNNING=1
fi

run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# The file $1 with the shipped paths replaced by this install's, written to $2 (mode 0644).
install_edited() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ install $1 -> $2 (venv $PREFIX/venv, spool $SPOOL)"
        return
    fi
    local tmp
    tmp=$(mktemp)
    sed -e "s#$DEFAULT_PREFIX/venv#$PREFIX/venv#g" -e "s#$DEFAULT_SPOOL#$SPOOL#g" "$1" >"$tmp"
    install -D -m 0644 "$tmp" "$2"
    rm -f "$tmp"
}

units_to_enable() {
    case $CLUSTER in
        head) echo diffusiond-ray-head.service diffusiond-cluster.service; return ;;
        node) echo diffusiond-ray-node.service; return ;;
    esac
    if [ -z "$GPUS" ]; then
        echo diffusiond.service
        return
    fi
    local list=$GPUS node
    if [ "$GPUS" = all ]; then
        list=""
        for node in /dev/nvidia[0-9]*; do
            [ -e "$node" ] && list="$list ${node#/dev/nvidia}"
        done
        if [ -z "$list" ]; then
            echo "--gpus all: no /dev/nvidiaN here" >&2
            return 1
        fi
    fi
    local n
    for n in ${list//,/ }; do
        case $n in *[!0-9]*) echo "--gpus: '$n' is not a GPU index" >&2; return 1 ;; esac
        echo "diffusiond@$n.service"
    done
}

# new_file PATH WHAT [KEPT]: succeeds when PATH is to be written now (its folder made); else says
# why not: it exists (kept as it is, KEPT appended), or this is a dry run (WHAT: what it would hold).
new_file() {
    if [ -e "$1" ]; then
        echo "$1 exists; left as it is${3:-}"
        return 1
    fi
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ write $1 ($2)"
        return 1
    fi
    install -d -m 0755 "$(dirname "$1")"
}

write_config() {
    local config=$ROOT/etc/diffusiond/config.yaml
    new_file "$config" "spool: $SPOOL" " (its spool: must be $SPOOL)" || return 0
    cat >"$config" <<EOF
# diffusiond config, written by systemd/install.sh: every field is optional (README.md, "The config").
# After an edit: systemctl reload diffusiond (or diffusiond@N for each instance).
spool: $SPOOL              # inbox/ outbox/ archive/ failed/ work/, shared by group diffusiond
device: auto               # diffusiond@N.service overrides it (--device cuda:0, GPU N only)
dtype: auto                # fp16 on GPU
models: {}
  # Models under /var/lib/diffusiond/models or /opt (the service cannot read /home), e.g.
  # sd15: /var/lib/diffusiond/models/stable-diffusion-v1-5
preload: []                # models loaded before the service reports ready
watch: {mode: auto}        # poll for a spool on SMB/NFS
EOF
    chmod 0644 "$config"
    echo "wrote $config: add your models"
}

# The cluster's addresses, for the Ray units: a template to fill in, unless there is one.
write_cluster_env() {
    local env=$ROOT/etc/diffusiond/cluster.env
    new_file "$env" "a template: the head's address and this host's" || return 0
    cat >"$env" <<EOF
# The Ray cluster of diffusiond (README.md, "Several hosts"), read by diffusiond-ray-head,
# diffusiond-ray-node and diffusiond-cluster. Fill in both, then: systemctl enable --now <the units>.
# The head's address and Ray port, the same on every host (e.g. 10.0.0.1:6379):
DIFFUSIOND_RAY_HEAD=
# This host's address on the cluster network (Ray listens on every interface; the units allow
# the private ranges only):
DIFFUSIOND_RAY_IP=
EOF
    chmod 0644 "$env"
    echo "wrote $env: fill in DIFFUSIOND_RAY_HEAD and DIFFUSIOND_RAY_IP"
}

# On the head: the cluster's token, unless there is one. 64 hex digits from the kernel's random
# source, the form `ray get-auth-token --generate` makes, in a file only the service user reads
# (Ray's own writes it under the umask: 0644 by default).
write_token() {
    local token=$ROOT/etc/diffusiond/ray-token
    if [ -s "$token" ]; then
        echo "$token exists; left as it is"
        return
    fi
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ write $token (a new token, mode 0600, owner diffusiond)"
        return
    fi
    install -d -m 0755 "$ROOT/etc/diffusiond"
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$token")
    echo "wrote $token: copy it to every node of the cluster (install.sh --cluster node sets its mode and owner)"
}

# The token as the units need it, on every cluster host: readable by the service user only. A copy
# made as root (scp) would leave it unreadable to Ray, and a Ray that exits 1 at start looks like a
# clean stop to its unit (SuccessExitStatus=1): restarted every 10 s, never shown as failed.
own_token() {
    local token=$ROOT/etc/diffusiond/ray-token
    if [ ! -s "$token" ] || [ "$DRY_RUN" = 1 ]; then
        return
    fi
    chmod 0600 "$token"
    if [ -z "$ROOT" ]; then
        chown diffusiond:diffusiond "$token"
    fi
}

# What the cluster units still need before they can start (the addresses, the token), or nothing.
cluster_not_ready() {
    local env=$ROOT/etc/diffusiond/cluster.env token=$ROOT/etc/diffusiond/ray-token
    if { [ "$DRY_RUN" = 0 ] && [ ! -e "$env" ]; } || { [ -e "$env" ] && grep -Eq '^DIFFUSIOND_RAY_(HEAD|IP)=[[:space:]]*$' "$env"; }; then
        echo "fill in DIFFUSIOND_RAY_HEAD and DIFFUSIOND_RAY_IP in $env"
    elif [ "$DRY_RUN" = 1 ] && [ ! -e "$env" ]; then
        echo "fill in DIFFUSIOND_RAY_HEAD and DIFFUSIOND_RAY_IP in $env (written as a template)"
    fi
    if [ ! -s "$token" ] && ! { [ "$DRY_RUN" = 1 ] && [ "$CLUSTER" = head ]; }; then
        echo "copy the cluster's token from the head's /etc/diffusiond/ray-token to $token"
    fi
}

# Where ProtectHome=yes hides the interpreter $1 (its real path, or the stdlib's), or nothing.
hidden_part() {
    local place
    while read -r place; do
        case $place in /home | /home/* | /root | /root/* | /run/user | /run/user/*) echo "$place"; return ;; esac
    done < <("$1" -c 'import os, sys; print(os.path.realpath(sys.executable)); print(os.path.realpath(sys.base_prefix))')
}

# The interpreter for the venv: $PYTHON as given, or the first usable of python3 and /usr/bin/python3.
pick_python() {
    local candidate hidden given=$PYTHON
    for candidate in ${given:-python3 /usr/bin/python3}; do
        if ! command -v "$candidate" >/dev/null 2>&1 || ! "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            [ -n "$given" ] && { echo "--python $given: not an interpreter of Python 3.11 or later" >&2; return 1; }
            continue
        fi
        hidden=$(hidden_part "$candidate")
        if [ -z "$hidden" ]; then
            command -v "$candidate"
            return
        fi
        if [ -n "$given" ]; then
            echo "--python $given lives in $hidden, which the service cannot see (ProtectHome=yes): it would fail" \
                "with 203/EXEC. Use a system Python (apt-get install python3 python3-venv) or one under /opt." >&2
            return 1
        fi
        echo "note: $candidate lives in $hidden, which the service cannot see (ProtectHome=yes); trying the next" >&2
    done
    echo "no Python 3.11+ outside /home, /root and /run/user (the service cannot see those): install one" \
        "(apt-get install python3 python3-venv) or give --python /opt/.../bin/python3" >&2
    return 1
}

# Whether the journal extra (systemd-python, built from source) can build with the venv's Python $1.
journal_builds() {
    pkg-config --exists libsystemd 2>/dev/null && command -v cc >/dev/null 2>&1 &&
        "$1" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

install_venv() {
    local python venv=$ROOT$PREFIX/venv extra=""
    [ -n "$CLUSTER" ] && extra=",cluster" # plain ray: not ray[default], whose dashboard doubles the memory
    python=$(pick_python) || exit 1
    echo "venv $venv from $python"
    run "$python" -m venv "$venv"
    run "$venv/bin/pip" install -q --disable-pip-version-check "$TORCH"
    local journal=$JOURNAL
    if [ "$journal" = auto ]; then
        if journal_builds "$python"; then
            journal=yes
        else
            journal=no
            echo "note: the journal extra does not build here (needs libsystemd-dev pkg-config, a C compiler and" \
                "$python's headers, e.g. python3-dev): the service logs without JOB_ID=... fields" >&2
        fi
    fi
    if [ "$journal" = yes ]; then
        if run "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "${SRC}[systemd$extra]"; then
            echo "with the journal extra: journalctl -u diffusiond JOB_ID=<job_id> finds a job's lines"
            return
        fi
        [ "$JOURNAL" = yes ] && { echo "--journal yes: the journal extra (systemd-python) did not build" >&2; exit 1; }
        echo "note: the journal extra did not build (output above); installing without it" >&2
    fi
    run "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$SRC${extra:+[${extra#,}]}"
}

do_install() {
    local units
    units=$(units_to_enable | xargs)

    # 1. The venv, from this checkout.
    if [ "$VENV" = 1 ]; then
        install_venv
    fi

    # 2. The user and group, then the folders.
    install_edited "$UNITS_SRC/diffusiond.sysusers" "$ROOT/etc/sysusers.d/diffusiond.conf"
    install_edited "$UNITS_SRC/diffusiond.tmpfiles" "$ROOT/etc/tmpfiles.d/diffusiond.conf"
    if [ -n "$ROOT" ]; then
        run systemd-sysusers --root="$ROOT" diffusiond.conf
        run systemd-tmpfiles --root="$ROOT" --create diffusiond.conf
    else
        run systemd-sysusers diffusiond.conf
        # A spool on a root-squashed NFS share cannot be chowned from here: say so, go on.
        run systemd-tmpfiles --create diffusiond.conf ||
            echo "warning: systemd-tmpfiles could not set up every folder (a network spool?): check $SPOOL" >&2
    fi

    # 3. The config, unless there is one (and the cluster's addresses).
    write_config
    if [ -n "$CLUSTER" ]; then
        write_cluster_env
        if [ "$CLUSTER" = head ]; then
            write_token
        fi
        own_token
    fi

    # 4. The units.
    install_edited "$UNITS_SRC/diffusiond.service" "$UNIT_DIR/diffusiond.service"
    install_edited "$UNITS_SRC/diffusiond@.service" "$UNIT_DIR/diffusiond@.service"
    install_edited "$UNITS_SRC/diffusiond-web.service" "$UNIT_DIR/diffusiond-web.service"
    local unit missing=""
    if [ -n "$CLUSTER" ]; then
        for unit in $units; do
            install_edited "$UNITS_SRC/$unit" "$UNIT_DIR/$unit"
        done
        missing=$(cluster_not_ready)
    fi
    # shellcheck disable=SC2086 # $units is a list of unit names
    if [ -n "$missing" ]; then
        if [ "$SYSTEMD_RUNNING" = 1 ]; then
            run systemctl daemon-reload
        fi
        echo "not started yet: $units. First:"
        printf '  %s\n' "$missing"
        echo "then: systemctl enable --now $units"
    elif [ "$SYSTEMD_RUNNING" = 1 ]; then
        run systemctl daemon-reload
        run systemctl enable --now $units
        echo "enabled and started: $units; logs: journalctl -u 'diffusiond*' -f"
    else
        echo "systemd is not running here; on the target system run:"
        echo "  systemctl daemon-reload && systemctl enable --now $units"
    fi
    echo "submitters join the group: usermod -aG diffusiond USER"
    echo "the status page (loopback, read-only): systemctl enable --now diffusiond-web; http://127.0.0.1:8765/"
}

do_uninstall() {
    local units="" link
    for link in "$UNIT_DIR"/multi-user.target.wants/diffusiond.service \
        "$UNIT_DIR"/multi-user.target.wants/diffusiond@*.service \
        "$UNIT_DIR"/multi-user.target.wants/diffusiond-ray-*.service \
        "$UNIT_DIR"/multi-user.target.wants/diffusiond-cluster.service; do
        [ -e "$link" ] || [ -L "$link" ] && units="$units ${link##*/}"
    done
    if [ "$SYSTEMD_RUNNING" = 1 ]; then
        # shellcheck disable=SC2086 # a list of unit names
        [ -n "$units" ] && run systemctl disable --now $units
        run systemctl disable --now diffusiond-web.service 2>/dev/null || true
        run systemctl stop 'diffusiond.service' 'diffusiond@*.service' 'diffusiond-ray-*.service' diffusiond-cluster.service || true
    elif [ -n "$units" ]; then
        # shellcheck disable=SC2086 # a list of unit names
        run systemctl --root="${ROOT:-/}" disable $units
    fi
    run rm -f "$UNIT_DIR/diffusiond.service" "$UNIT_DIR/diffusiond@.service" "$UNIT_DIR/diffusiond-web.service" \
        "$UNIT_DIR/diffusiond-ray-head.service" "$UNIT_DIR/diffusiond-ray-node.service" "$UNIT_DIR/diffusiond-cluster.service"
    run rm -rf "$UNIT_DIR/diffusiond.service.d" "$UNIT_DIR/diffusiond@.service.d" "$UNIT_DIR"/diffusiond-ray-*.service.d \
        "$UNIT_DIR/diffusiond-cluster.service.d"
    [ "$SYSTEMD_RUNNING" = 1 ] && run systemctl daemon-reload
    run rm -f "$ROOT/etc/sysusers.d/diffusiond.conf" "$ROOT/etc/tmpfiles.d/diffusiond.conf"
    run rm -rf "$ROOT$PREFIX/venv"
    [ -d "$ROOT$PREFIX" ] && run rmdir --ignore-fail-on-non-empty "$ROOT$PREFIX"
    cat <<EOF
removed the units, the venv and the sysusers/tmpfiles snippets. Kept, to remove by hand:
  the config       rm -r $ROOT/etc/diffusiond   (cluster.env and ray-token too, on a cluster host)
  spool and state  rm -r $ROOT/var/lib/diffusiond $ROOT/var/cache/diffusiond   (results are in the spool's outbox/)
  user and group   userdel diffusiond; groupdel diffusiond
EOF
}

if [ "$UNINSTALL" = 1 ]; then
    do_uninstall
else
    do_install
fi
