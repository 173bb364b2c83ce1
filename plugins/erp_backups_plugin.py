"""The Backups page in the Airflow UI: a FastAPI app and its navigation entry (erp_backup.backups_page).

Served by the api-server under /erp-backups, behind Airflow's login (the UI's JWT cookie or a
bearer token, checked by Airflow's own `requires_authenticated`); shown in the UI's navigation
as "Backups", inside the UI (url_route /plugin/backups).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from erp_backup.backups_page.app import page_html

URL_PREFIX = "/erp-backups"


def _requires_login() -> object:
    from airflow.api_fastapi.core_api.security import requires_authenticated

    return Depends(requires_authenticated())


app = FastAPI(title="ALL-ERP backups", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/", response_class=HTMLResponse, dependencies=[_requires_login()])  # type: ignore[list-item]
def backups_page() -> HTMLResponse:
    return HTMLResponse(page_html())


class ErpBackupsPlugin(AirflowPlugin):
    name = "erp_backups"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "ALL-ERP backups"}]  # noqa: RUF012
    external_views = [{  # noqa: RUF012
        "name": "Backups",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "backups",
    }]
