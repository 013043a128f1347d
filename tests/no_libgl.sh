#!/usr/bin/env bash
# Run PYTHON -c SNIPPET with libGL, X11, xcb, gthread and glib hidden from the dynamic loader, as on a slim
# server or in a container: a private mount namespace where an overlay of each library folder whites those
# files out (or /dev/null is bound over them). Exits with the snippet's status, 125 when it cannot hide them.
# Usage: tests/no_libgl.sh PYTHON SNIPPET [ARGS...]   (root, or unprivileged user namespaces)
set -u

HIDE_DEFAULT='libGL.so* libGLX* libEGL* libOpenGL.so* libGLU.so* libGLES* libGLdispatch.so*
 libX11.so* libX11-xcb.so* libXext.so* libSM.so* libICE.so* libxcb*.so*
 libgthread-2.0.so* libglib-2.0.so*'
HIDE=${NO_LIBGL_HIDE:-$HIDE_DEFAULT}

die() { echo "no_libgl.sh: $*" >&2; exit 125; }
dbg() { [ "${NO_LIBGL_DEBUG:-0}" = 1 ] && echo "no_libgl.sh: $*" >&2; return 0; }

[ $# -ge 2 ] || { echo "usage: $0 PYTHON SNIPPET [ARGS...]" >&2; exit 2; }

if [ -z "${_NO_LIBGL_INNER:-}" ]; then
    # ---- outer: make a scratch dir, re-exec self in a new mount namespace
    command -v unshare >/dev/null || die "unshare (util-linux) not found"
    tmp=$(mktemp -d /tmp/no_libgl.XXXXXX) || die "mktemp failed"
    if [ "$(id -u)" = 0 ]; then
        _NO_LIBGL_INNER=$tmp unshare --mount --propagation private -- bash "$0" "$@"
    else
        _NO_LIBGL_INNER=$tmp unshare --user --map-root-user --mount \
            --propagation private -- bash "$0" "$@"
    fi
    rc=$?
    rmdir "$tmp" 2>/dev/null
    exit $rc
fi

# ---- inner: we are in a private mount namespace
PY=$1; shift
SNIP=$1; shift
T=$_NO_LIBGL_INNER
unset _NO_LIBGL_INNER
mount -t tmpfs tmpfs "$T" || die "cannot mount tmpfs (need root/CAP_SYS_ADMIN)"

# Candidate library directories: standard ones, ldconfig cache, LD_LIBRARY_PATH.
dirs=$( {
    printf '%s\n' /lib /lib64 /usr/lib /usr/lib64 /usr/local/lib \
        /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu \
        /lib/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu
    ldconfig -p 2>/dev/null | awk -F' => ' 'NF==2{print $2}' | xargs -r -n1 dirname
    LLP=${LD_LIBRARY_PATH:-}; printf "%s\n" ${LLP//:/ }
} | while read -r d; do [ -d "$d" ] && readlink -f "$d"; done | sort -u )

set -f  # keep the patterns literal until we glob them per directory
n=0
for d in $dirs; do
    matches=()
    for p in $HIDE; do
        set +f
        for f in "$d"/$p; do
            [ -e "$f" ] || [ -L "$f" ] || continue
            matches+=("$(basename "$f")")
        done
        set -f
    done
    [ ${#matches[@]} -gt 0 ] || continue
    n=$((n + 1))
    up=$T/u$n; wk=$T/w$n
    mkdir -p "$up" "$wk"
    ok=1
    for m in "${matches[@]}"; do mknod "$up/$m" c 0 0 2>/dev/null || { ok=0; break; }; done
    if [ $ok = 1 ] && mount -t overlay overlay \
            -o "lowerdir=$d,upperdir=$up,workdir=$wk" "$d" 2>/dev/null; then
        dbg "overlay on $d hides: ${matches[*]}"
    else
        dbg "overlay failed on $d; falling back to /dev/null bind mounts"
        for m in "${matches[@]}"; do
            r=$(readlink -f "$d/$m")
            [ -f "$r" ] && { mount --bind /dev/null "$r" || die "bind mount failed on $r"; }
        done
    fi
done
set +f

# Sanity check: the simulation is void if libGL can still be dlopen'ed.
if "$PY" -c 'import ctypes,sys
try: ctypes.CDLL("libGL.so.1")
except OSError: sys.exit(1)' 2>/dev/null; then
    die "libGL.so.1 is still loadable; simulation failed"
fi

"$PY" -c "$SNIP" "$@"
