"""Parse one DAG file with a fresh DagBag in this (fresh) process; print the timing as JSON.

Airflow itself is imported before the clock starts, as in the DAG processor,
so the time is what the file costs: its imports (erp_backup, the plan) and DAG building.

With `--preload`, the two costs the project pays at parse time are paid first
and timed apart (the Slack notifier's import, which brings slack_sdk and aiohttp,
and the first Asset with a URI, which loads every provider's URI handlers),
so the DagBag time shows what the file costs without them.
"""

from __future__ import annotations

import json
import sys
import time

RESULT_MARKER = "BENCH_RESULT "  # the line the parent parses; logs may share stdout


def main() -> None:
    path = sys.argv[1]
    preload = "--preload" in sys.argv[2:]
    from airflow.dag_processing.dagbag import DagBag

    preloaded: dict[str, float] = {}
    if preload:
        clock = time.monotonic()
        import airflow.providers.slack.notifications.slack_webhook  # noqa: F401

        preloaded["slack_notifier_import"] = time.monotonic() - clock
        from airflow.sdk import Asset

        clock = time.monotonic()
        Asset(name="bench", uri="erp-backup://bench/full")
        preloaded["first_asset_uri"] = time.monotonic() - clock

    clock = time.monotonic()
    dagbag = DagBag(dag_folder=path)
    seconds = time.monotonic() - clock
    sys.stdout.write(RESULT_MARKER)
    json.dump({
        "seconds": seconds,
        "preloaded": preloaded,
        "dagbag_seconds": sum(s.duration.total_seconds() for s in dagbag.dagbag_stats),
        "dags": len(dagbag.dags),
        "import_errors": {str(k): str(v)[-500:] for k, v in dagbag.import_errors.items()},
    }, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
