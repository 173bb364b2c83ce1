#!/bin/sh
# As the official image: `bash`/`python` run as given, anything else is an airflow command.
set -eu
case "${1:-}" in
    "") exec airflow --help ;;
    bash|sh|python|python3|/*) exec "$@" ;;
    *) exec airflow "$@" ;;
esac
