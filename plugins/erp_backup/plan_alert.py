"""Telling Slack that service blocks of the backup plan are broken, from the DAGs that still load.

The watchdog alerts through its own `plan` row (once, then a recovery); the drill calls
`alert_plan_errors` at each run, since a drill of a plan with missing services is incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from erp_backup.notify import send as slack_send
from erp_backup.plan import Plan

log = logging.getLogger(__name__)


def plan_error_text(plan: Plan, who: str) -> str:
    lines = "".join(f"\n• `{service}`: {error}" for service, error in sorted(plan.service_errors.items()))
    return (
        f":warning: *{who}: the backup plan has broken service blocks*; their backup DAGs are not loaded "
        f"and they are left out of this run:{lines}\nFix {plan.path}; dags/backup_plan_check.py shows the "
        "same errors as an import error in the Airflow UI."
    )


def alert_plan_errors(plan: Plan, who: str, send: Callable[[str, str], bool] = slack_send) -> bool:
    """Log and post the plan's broken service blocks; False when there are none or Slack failed."""
    if not plan.service_errors:
        return False
    text = plan_error_text(plan, who)
    log.error("%s", text)
    return send(plan.slack_conn_id, text)
