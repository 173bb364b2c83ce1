"""`python -m erp_backup`: the restore CLI, usable with Airflow down (see erp_backup.cli)."""

import sys

from erp_backup import cli

if __name__ == "__main__":
    sys.exit(cli.main())
