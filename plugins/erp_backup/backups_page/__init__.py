"""The Backups page in the Airflow UI: what an operator needs at a glance.

- `model`: reads the plan, the staging sets, the offsite manifests (checked, as the watchdog
  and `list --from offsite` do) and the drill ledger into typed rows. No state of its own.
- `render`: the rows as one HTML page with inline SVG sparklines and RTO charts.

The Airflow plugin (`plugins/erp_backups_plugin.py`) serves it behind Airflow's login.
"""
