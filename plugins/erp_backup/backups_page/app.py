"""What the plugin's one route does: read everything for now, render it. Airflow-free below this call."""

from __future__ import annotations

from erp_backup.backups_page.model import build_page
from erp_backup.backups_page.render import render


def page_html() -> str:
    from erp_backup.drill.records import read_ledger
    from erp_backup.offsite import offsite_from_plan
    from erp_backup.plan import load_plan
    from erp_backup.runs import utcnow

    plan = load_plan()
    store = offsite_from_plan(plan)
    try:
        ledger = read_ledger(plan, store)
    except OSError:
        ledger = []
    return render(build_page(plan, utcnow(), store, ledger))
