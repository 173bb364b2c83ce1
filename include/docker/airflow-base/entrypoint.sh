#!/bin/sh
# As the official image's entrypoint, for what docker-compose.yaml uses:
# - `airflow <command>` and `<command>` both run `airflow <command>`; `bash`, `sh`,
#   `python` and absolute paths run as given.
# - _AIRFLOW_DB_MIGRATE=true runs `airflow db migrate` first (airflow-init).
# - _AIRFLOW_WWW_USER_CREATE=true would create a FAB user; this stand-in has no FAB
#   provider, so it says so and goes on (the simple auth manager's users come from
#   its config).
set -eu
explicit_airflow=
if [ "${1:-}" = "airflow" ]; then
    shift
    explicit_airflow=1
fi
if [ "${_AIRFLOW_DB_MIGRATE:-}" = "true" ]; then
    echo "entrypoint: airflow db migrate" >&2
    airflow db migrate
fi
if [ "${_AIRFLOW_WWW_USER_CREATE:-}" = "true" ]; then
    echo "entrypoint: _AIRFLOW_WWW_USER_CREATE ignored: this stand-in image has no FAB auth manager" >&2
fi
[ -z "$explicit_airflow" ] || exec airflow "$@"
case "${1:-}" in
    "") exec airflow --help ;;
    bash|sh|python|python3|/*) exec "$@" ;;
    *) exec airflow "$@" ;;
esac
