"""The drill report where operators look: the DAG run's note (Markdown, rendered by the UI) and UI links.

A task cannot write its run's note through the execution API, so the report task sets it through
Airflow's REST API (`PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}`), as the user of the connection
`airflow_api` (host: the api-server's URL; login and password: a user allowed to edit DAG runs),
with a token from `POST /auth/token`. The note holds at most 1,000 characters (Airflow's limit):
the verdict, one line per service, and links to the Backups page and the full report. Setting the
note never fails the drill: a missing connection or a refused request is logged and recorded.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

API_CONN_ID = "airflow_api"
NOTE_LIMIT = 1000
BACKUPS_ROUTE = "plugin/backups"


def base_url() -> str:
    """The UI's address, as Airflow builds its log links (`[api] base_url`)."""
    from airflow.sdk.configuration import conf

    return str(conf.get("api", "base_url", fallback="http://localhost:8080/")).rstrip("/")


def links(base: str, dag_id: str, run_id: str) -> dict[str, str]:
    base = base.rstrip("/")
    return {"run": f"{base}/dags/{dag_id}/runs/{urllib.parse.quote(run_id, safe='')}",
            "backups": f"{base}/{BACKUPS_ROUTE}"}


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.2f} h"


def service_line(result: Mapping[str, Any]) -> str:
    name = result["service"] + (f" {result['backup_type']}/{result['backup_id']}" if result.get("backup_id") else "")
    status = result["status"] + (f" at {result['failed_step']}" if result.get("failed_step") else "")
    rto = result.get("rto") or {}
    if rto.get("measured_s") is not None:
        status += (f", RTO {_seconds(rto['measured_s'])} (extrapolated {_seconds(rto.get('extrapolated_s'))}, "
                   f"target {_seconds(rto.get('target_s'))})")
    return f"- **{name}**: {status}"


def note_markdown(report: Mapping[str, Any], headline: str) -> str:
    """The run's note: verdict, one line per service, links; cut to NOTE_LIMIT characters, links kept."""
    link_lines = []
    if report.get("links"):
        link_lines.append(f"[Backups page]({report['links']['backups']})")
    if report.get("report_files"):
        link_lines.append(f"Full report: `{report['report_files']['markdown']}`")
    head = [f"**DR drill: {headline}**"] + ([f"Error: {report['error']}"] if report.get("error") else [])
    body = [service_line(result) for result in report.get("services") or []]
    tail = ["", " · ".join(link_lines)] if link_lines else []
    verdict = "\n\n".join(head)  # paragraphs: Markdown joins single-newline lines into one
    text = "\n".join([verdict, "", *body, *tail])
    while len(text) > NOTE_LIMIT and body:
        body.pop()
        text = "\n".join([verdict, "", *body, "- …(more in the full report)", *tail])
    return text[:NOTE_LIMIT]


def _request(url: str, method: str, body: Mapping[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


def set_note(dag_id: str, run_id: str, note: str, conn_id: str = API_CONN_ID) -> str | None:
    """Set the run's note; returns None, or why it could not be set (never raises)."""
    try:
        from airflow.sdk import BaseHook

        connection = BaseHook.get_connection(conn_id)
        host = str(connection.host or "").rstrip("/")
        if not host.startswith(("http://", "https://")):
            host = f"http://{host}" + (f":{connection.port}" if connection.port else "")
        token = _request(f"{host}/auth/token", "POST", {"username": connection.login, "password": connection.password})
        run = urllib.parse.quote(run_id, safe="")
        _request(f"{host}/api/v2/dags/{dag_id}/dagRuns/{run}?update_mask=note", "PATCH", {"note": note},
                 token["access_token"])
        return None
    except Exception as exc:  # the drill's result stands without its note
        from erp_backup.notify import one_line

        why = f"run note not set through connection {conn_id!r}: {one_line(exc)}"
        log.warning(why)
        return why
