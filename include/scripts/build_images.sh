#!/usr/bin/env bash
# Build every local image from Debian packages and PyPI, with no image registry:
#
#   erp-local/base:bookworm            debootstrap minbase + ca-certificates (docker import)
#   erp-local/postgres:15              PostgreSQL 15, the official image's POSTGRES_* variables
#   erp-local/redis:7                  redis-server
#   erp-local/rabbitmq:3.10-management RabbitMQ with the management plugin
#   erp-local/etcd:3.4                 etcd
#   erp-local/socat:1                  socat, the drill's port forwarder (drill.docker.images.proxy)
#   erp-local/airflow-base:3.3.2       a stand-in for apache/airflow (the tests' Python 3.11, user airflow 50000:0)
#   all-erp/airflow-backup:3.3.2       the project's Dockerfile, FROM the stand-in
#
# Idempotent: each image carries the hash of its inputs (its directory under
# include/docker/, its parent's hash, for the Airflow image also the Dockerfile,
# requirements.txt and constraints.txt) in the label org.all-erp.inputs; an image
# whose label matches is skipped. Needs DOCKER_HOST (the tests' private daemon),
# root for debootstrap, and the Debian mirror of this machine's apt sources.
# Python packages come from a wheelhouse built on the host with pip (so pip's own
# index, certificates and proxy settings apply) and served on 127.0.0.1 to the build.
#
#   DOCKER_HOST=unix:///run/erp-test-docker.sock include/scripts/build_images.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOCKER_DIR=$ROOT/include/docker
DOCKER=${DOCKER:-/usr/bin/docker}        # Debian's client, the daemon's own version
PY=${PY:-$ROOT/.venv/bin/python}
WHEEL_CACHE=${ERP_WHEEL_CACHE:-/var/lib/erp-test-docker-wheels}
LABEL=org.all-erp.inputs
export DOCKER_BUILDKIT=0                 # the classic builder: --network host, no frontend image to pull

: "${DOCKER_HOST:?set DOCKER_HOST to the daemon to build in}"

log() { printf 'build_images: %s\n' "$*" >&2; }

hash_of() {  # hash_of PARENT_HASH PATH... : one hash over the parent's hash and the files' names and bytes
    local parent=$1; shift
    { echo "$parent"; find "$@" -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16
}

have() {  # have IMAGE HASH : the image exists with that input hash
    [[ $("$DOCKER" image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null) == "$2" ]]
}

debian_mirror() {
    local found
    found=$(grep -rhE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?' | grep -v -- '-security' | head -1 || true)
    echo "${ERP_DEBIAN_MIRROR:-${found:-http://deb.debian.org/debian}}"
}

build_base() {  # debootstrap a minbase bookworm and import it
    local image=erp-local/base:bookworm mirror hash rootfs
    mirror=$(debian_mirror)
    hash=$(echo "minbase bookworm ca-certificates $mirror" | sha256sum | cut -c1-16)
    if have "$image" "$hash"; then log "$image is up to date"; echo "$hash"; return; fi
    log "$image: debootstrap bookworm from $mirror"
    rootfs=$(mktemp -d /var/tmp/erp-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"; trap - RETURN' RETURN
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import --change "LABEL $LABEL=$hash" --change 'CMD ["bash"]' - "$image" >/dev/null
    echo "$hash"
}

build_dir() {  # build_dir IMAGE DIR PARENT_HASH [build args...] : docker build of include/docker/DIR
    local image=$1 dir=$DOCKER_DIR/$2 parent=$3 hash; shift 3
    hash=$(hash_of "$parent" "$dir")
    if have "$image" "$hash"; then log "$image is up to date"; echo "$hash"; return; fi
    log "$image: building"
    "$DOCKER" build -q --network host --label "$LABEL=$hash" "$@" -t "$image" "$dir" >/dev/null
    echo "$hash"
}

wheelhouse() {  # the project's wheels, once per requirements/constraints pair
    local key dir
    key=$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)
    dir=$WHEEL_CACHE/$key
    if [[ ! -f $dir/.complete ]]; then
        log "wheelhouse $dir: pip wheel"
        mkdir -p "$dir"
        "$PY" -m pip wheel -q -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" -w "$dir" 2>&1 \
            | grep -v 'is ignored: it is neither a file nor a directory' >&2 || true
        ls "$dir"/apache_airflow-*.whl >/dev/null  # the wheelhouse is complete only if pip got that far
        touch "$dir/.complete"
    fi
    echo "$dir"
}

build_airflow_base() {  # the stand-in for apache/airflow, with the interpreter of $PY (see its Dockerfile)
    local image=erp-local/airflow-base:3.3.2 parent=$1 prefix version hash context
    prefix=$("$PY" -c 'import sys; print(sys.base_prefix)')
    version=$("$PY" -c 'import sys; print(sys.version)')
    hash=$(hash_of "$parent$version" "$DOCKER_DIR/airflow-base")
    if have "$image" "$hash"; then log "$image is up to date"; echo "$hash"; return; fi
    log "$image: building with Python from $prefix"
    context=$(mktemp -d /var/tmp/erp-airflow-base.XXXXXX)
    trap 'rm -rf "$context"; trap - RETURN' RETURN
    cp "$DOCKER_DIR"/airflow-base/* "$context/"
    tar -C "$prefix" -cf "$context/python.tar" --exclude='__pycache__' --exclude='lib/python3.11/site-packages/*' \
        --exclude='lib/python3.11/test' --exclude='lib/python3.11/tkinter' --exclude='lib/python3.11/idlelib' \
        --exclude='lib/python3.11/lib-dynload/_tkinter*' bin/python3.11 lib/libpython3.11.so.1.0 lib/python3.11
    "$DOCKER" build -q --network host --label "$LABEL=$hash" -t "$image" "$context" >/dev/null
    echo "$hash"
}

build_airflow() {  # the project's Dockerfile on the local stand-in base, wheels over loopback HTTP
    local image=all-erp/airflow-backup:3.3.2 parent=$1 hash wheels context port server
    hash=$(hash_of "$parent" "$ROOT/Dockerfile" "$ROOT/requirements.txt" "$ROOT/constraints.txt")
    if have "$image" "$hash"; then log "$image is up to date"; return; fi
    wheels=$(wheelhouse)
    context=$(mktemp -d /var/tmp/erp-airflow-context.XXXXXX)
    cp "$ROOT/Dockerfile" "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$context/"
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null; rm -rf "$context"; trap - RETURN' RETURN
    log "$image: building on erp-local/airflow-base:3.3.2"
    "$DOCKER" build -q --network host --label "$LABEL=$hash" \
        --build-arg AIRFLOW_IMAGE=erp-local/airflow-base:3.3.2 \
        --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" \
        -t "$image" "$context" >/dev/null
}

main() {
    local base pg redis rabbit etcd socat airflow_base
    exec 9>"${ERP_BUILD_LOCK:-/run/erp-build-images.lock}"
    flock 9  # one build at a time per machine; a second run waits, then finds everything up to date
    base=$(build_base)
    pg=$(build_dir erp-local/postgres:15 postgres "$base")
    redis=$(build_dir erp-local/redis:7 redis "$base")
    rabbit=$(build_dir erp-local/rabbitmq:3.10-management rabbitmq "$base")
    etcd=$(build_dir erp-local/etcd:3.4 etcd "$base")
    socat=$(build_dir erp-local/socat:1 socat "$base")
    airflow_base=$(build_airflow_base "$base")
    build_airflow "$airflow_base"
    : "$pg" "$redis" "$rabbit" "$etcd" "$socat"
    log "all images up to date"
}

main "$@"
