#!/usr/bin/env bash
# Install missing system packages (Debian, as root) and start the services the tests need.
# Idempotent: packages already present are not reinstalled, running services are left alone.
set -euo pipefail

# docker.io, docker-compose, debootstrap: the tests' private Docker engine and its images
# (tests/fixtures/docker_engine.py, include/scripts/build_images.sh).
PACKAGES=(postgresql-15 postgresql-client-15 zstd etcd-server etcd-client redis-server redis-tools rabbitmq-server coreutils util-linux age
          docker.io docker-compose debootstrap
          chromium fonts-liberation)  # chromium: the browser tests (Playwright drives it; never `playwright install`)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ensure_system: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "ensure_system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts etcd as a service on install; the tests start their own on free ports.
  pkill -x etcd 2>/dev/null || true
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "ensure_system: starting PostgreSQL"
  cluster=$(ls /etc/postgresql | sort -V | tail -n1)
  pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "ensure_system: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "ensure_system: starting RabbitMQ"
  rabbitmq-server -detached
  rabbitmqctl -q wait --timeout 120 /var/lib/rabbitmq/mnesia/rabbit@"$(hostname -s)".pid 2>/dev/null \
    || rabbitmqctl -q await_startup --timeout 120 || true
fi
pg_isready -h 127.0.0.1 -p 5432
redis-cli -h 127.0.0.1 -p 6379 ping
rabbitmqctl -q status >/dev/null && echo "rabbitmq: running"
