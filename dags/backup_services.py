"""Airflow backup DAGs: one per enabled (service, backup type) in include/backup_plan.yaml.

Each is backup → checksum → offsite_upload → retention_prune; see erp_backup.factory.
"""

from erp_backup.factory import build_all
from erp_backup.plan import load_plan

globals().update(build_all(load_plan()))
