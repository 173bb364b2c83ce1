"""Shared test set-up. Airflow reads its config at import, so the environment is set first.

Each fixture module under tests/fixtures/ owns one service.
"""

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="erp-airflow-home-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__API__BASE_URL"] = "http://airflow.test:8080"
os.environ.setdefault("ERP_BACKUP_ROOT", str(_AIRFLOW_HOME / "backup"))

# Every test runs with encryption on, as the plan says by default: one age keypair per session,
# the recipient and the identity through the connections the plan names (erp_backup.crypto).
from tests.fixtures.keys import provision_age_keys  # noqa: E402

AGE_KEYS = provision_age_keys(os.environ)

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.slack",
    "tests.fixtures.postgres",
    "tests.fixtures.airflow",
    "tests.fixtures.pg_estate",
    "tests.fixtures.pitr",
    "tests.fixtures.milvus",
    "tests.fixtures.docker_engine",
]
