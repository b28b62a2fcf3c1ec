#!/usr/bin/env bash
# Start/stop a throw-away single-node Ceph cluster + RADOS Gateway (S3) on loopback for tests.
#
#   ceph-rgw.sh start DIR   -> prints "endpoint=... access_key=... secret_key=... region=..."
#   ceph-rgw.sh stop DIR    -> kills the daemons and removes DIR's cluster state
#   ceph-rgw.sh status DIR
#
# Cluster: 1 mon, 0 mgr, 1 OSD on memstore (objects live in the OSD's RAM, no disk),
# pool size 1, auth none between daemons (S3 clients still need SigV4 with the keys below),
# radosgw with the beast frontend on 127.0.0.1. Debian bookworm packages (Ceph 16.2.x Pacific),
# installed with apt-get if missing. Needs root for apt-get only.
# Env: S3_ACCESS_KEY, S3_SECRET_KEY, START_TIMEOUT (s), CEPH_MEMSTORE_BYTES (OSD capacity, default 2 GiB).
set -euo pipefail

ACCESS_KEY=${S3_ACCESS_KEY:-rgwtestaccesskey}
SECRET_KEY=${S3_SECRET_KEY:-rgwtestsecretkey0123456789}
REGION=us-east-1 # any region signs fine; only CreateBucket LocationConstraint must match the zonegroup
START_TIMEOUT=${START_TIMEOUT:-150}
MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-2147483648}

die() { echo "ceph-rgw.sh: ERROR: $*" >&2; exit 1; }
log() { echo "ceph-rgw.sh: $*" >&2; }
vlog() { [ -z "${VERBOSE:-}" ] || echo "ceph-rgw.sh: [$(date +%T.%N | cut -c1-12)] $*" >&2; }

[ $# -ge 2 ] || die "usage: $0 start|stop|status DIR"
CMD=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
CONF=$DIR/ceph.conf
INFO=$DIR/endpoint.env
DAEMONS="rgw osd mon" # stop order

alive() { [ -f "$DIR/run/$1.fgpid" ] && kill -0 "$(cat "$DIR/run/$1.fgpid")" 2>/dev/null; }

print_info() {
    # shellcheck disable=SC1090
    . "$INFO"
    echo "endpoint=$S3_ENDPOINT access_key=$S3_ACCESS_KEY secret_key=$S3_SECRET_KEY region=$S3_REGION"
}

install_ceph() {
    local missing=0
    for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph curl python3; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    [ $missing = 0 ] && return
    [ "$(id -u)" = 0 ] || die "Ceph binaries missing and not root: apt-get install ceph-mon ceph-osd radosgw ceph-common curl"
    log "installing Debian Ceph packages (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 || { tail "$DIR/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        ceph-mon ceph-osd ceph-base ceph-common radosgw curl python3 >>"$DIR/apt.log" 2>&1 \
        || { tail -20 "$DIR/apt.log" >&2; die "apt-get install of ceph packages failed (see $DIR/apt.log)"; }
}

free_ports() {
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
EOF
}

# run a daemon in the foreground (-f) in its own session, remember its pid
launch() {
    local name=$1; shift
    rm -f "$DIR/run/$name.fgpid"
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$DIR/run/$name.fgpid" "$@" </dev/null >"$DIR/log/$name.out" 2>&1 &
    disown $! 2>/dev/null || true
    for _ in $(seq 1 50); do [ -s "$DIR/run/$name.fgpid" ] && break; sleep 0.1; done
}

ceph_cli() { timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"; }

fail() {
    local msg=$1
    for d in mon osd rgw; do
        [ -f "$DIR/log/$d.out" ] && { echo "--- $d.out (tail)" >&2; tail -5 "$DIR/log/$d.out" >&2; }
    done
    do_stop keep-logs
    die "$msg (logs in $DIR/log)"
}

# wait_for DESC SECONDS DAEMON CMD... : poll CMD until success; fail if DAEMON died or time is up
wait_for() {
    local desc=$1 secs=$2 d=$3; shift 3
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        alive "$d" || fail "ceph $d exited while waiting for $desc"
        [ $((SECONDS - t0)) -lt "$secs" ] || fail "timed out after ${secs}s waiting for $desc"
        sleep 0.5
    done
}

osd_up() { ceph_cli osd dump 2>/dev/null | grep -q '^osd.0 up'; }

# SigV4-signed probe (also warms up the lazily created bucket index/data pools)
probe() {
    local ep=$1 b="readiness-probe-$$" e h
    e=$(printf '' | sha256sum | cut -d' ' -f1); h=$(printf probe | sha256sum | cut -d' ' -f1)
    local c=(curl -sf -m 10 -o /dev/null --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY")
    "${c[@]}" -H "x-amz-content-sha256: $e" -X PUT "$ep/$b" &&
    "${c[@]}" -H "x-amz-content-sha256: $h" -H "Content-Type: application/octet-stream" -X PUT --data-binary probe "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" -X DELETE "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" -X DELETE "$ep/$b"
}

do_stop() {
    local pids="" p
    for d in $DAEMONS; do
        if alive "$d"; then p=$(cat "$DIR/run/$d.fgpid"); kill -TERM "$p" 2>/dev/null || true; pids="$pids $p"; fi
    done
    for _ in $(seq 1 30); do
        local any=0
        for p in $pids; do kill -0 "$p" 2>/dev/null && any=1; done
        [ $any = 0 ] && break
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    for p in $pids; do for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
    rm -rf "$DIR/mon" "$DIR/osd" "$DIR/rgw" "$DIR/run" "$DIR/monmap" "$INFO"
    [ "${1:-}" = keep-logs ] || rm -rf "$DIR/log" "$CONF"
}

do_start() {
    if alive rgw && [ -f "$INFO" ]; then log "already running"; print_info; return 0; fi
    do_stop
    local T0=$SECONDS
    install_ceph
    local T1=$SECONDS
    mkdir -p "$DIR"/{run,log,mon/a,osd/0,rgw}
    local MONP RGWP FSID
    read -r MONP RGWP < <(free_ports)
    FSID=$(cat /proc/sys/kernel/random/uuid)
    cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MONP
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = /dev/null
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/run/crash
mon data = $DIR/mon/\$id
osd data = $DIR/osd/\$id
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon max pg per osd = 1000
[client.rgw]
# radosgw defaults to ms_mon_client_mode=secure + auth_client_required=cephx, which cannot work with auth none
ms mon client mode = crc
auth client required = none
rgw frontends = beast endpoint=127.0.0.1:$RGWP tcp_nodelay=1
rgw data = $DIR/rgw
rgw enable usage log = false
EOF

    monmaptool --create --addv a "[v2:127.0.0.1:$MONP]" --fsid "$FSID" "$DIR/monmap" >"$DIR/log/mkfs.out" 2>&1 \
        || fail "monmaptool failed"
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >>"$DIR/log/mkfs.out" 2>&1 || fail "ceph-mon --mkfs failed"
    vlog "mkfs done"
    launch mon ceph-mon -c "$CONF" -i a -f
    wait_for "mon quorum" 60 mon ceph_cli mon stat

    vlog "mon in quorum"
    local id; id=$(ceph_cli osd create) || fail "ceph osd create failed"
    [ "$id" = 0 ] || fail "unexpected osd id '$id'"
    vlog "osd id allocated"
    ceph-osd -c "$CONF" -i 0 --mkfs >>"$DIR/log/mkfs.out" 2>&1 || fail "ceph-osd --mkfs failed"
    launch osd ceph-osd -c "$CONF" -i 0 -f
    wait_for "osd.0 up" 60 osd osd_up

    vlog "osd up"
    launch rgw radosgw -c "$CONF" -n client.rgw -f
    local ep="http://127.0.0.1:$RGWP"
    wait_for "radosgw http on $ep" 90 rgw curl -s -m 2 -o /dev/null "$ep/"
    vlog "rgw http up"
    timeout 60 radosgw-admin -c "$CONF" -n client.rgw user create --uid tester --display-name tester \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" >"$DIR/log/user.out" 2>&1 \
        || fail "radosgw-admin user create failed"
    vlog "user created"
    local left=$((START_TIMEOUT - (SECONDS - T1)))
    [ $left -gt 10 ] || left=10
    wait_for "signed S3 probe" "$left" rgw probe "$ep"

    cat >"$INFO" <<EOF
S3_ENDPOINT=$ep
S3_ACCESS_KEY=$ACCESS_KEY
S3_SECRET_KEY=$SECRET_KEY
S3_REGION=$REGION
EOF
    log "ready: install $((T1 - T0))s, cluster+rgw $((SECONDS - T1))s ($(radosgw --version 2>/dev/null | cut -d' ' -f1-3))"
    print_info
}

case $CMD in
    start) do_start ;;
    stop) do_stop; log "stopped" ;;
    status) if alive rgw && [ -f "$INFO" ]; then print_info; else echo "not running"; exit 1; fi ;;
    *) die "usage: $0 start|stop|status DIR" ;;
esac
