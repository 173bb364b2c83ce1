"""Backup plan check for the Airflow UI: this file defines no DAG; it fails to import while a
service block of include/backup_plan.yaml is broken, so the UI's import errors name the block.

Broken service blocks are left out of the plan (erp_backup.plan.load_plan): their backup DAGs
are not built, while every other service's DAGs, backup_watchdog and dr_drill still load.
The watchdog posts the errors to Slack once; the drill posts them at each run.
"""

from erp_backup.plan import load_plan

load_plan().raise_for_errors()
