#!/bin/sh
# Write the default user from the environment into rabbitmq.conf (0600, never argv), then run as rabbitmq.
set -eu
if [ "$(id -u)" = 0 ]; then
    conf=/etc/rabbitmq/rabbitmq.conf
    umask 077
    {
        echo "loopback_users = none"
        [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER"
        [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS"
        [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user_tags.administrator = true"
        true
    } > "$conf"
    chown rabbitmq:rabbitmq "$conf"
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$@"
fi
exec "$@"
