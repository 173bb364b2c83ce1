"""`make run`'s age keypair: made once under .estate/age, printed as the two connections (shell assignments).

The identity file is 0600 and never leaves .estate; the recipients connection holds the public key only.
Usage: eval "$(local_keys.py DIR)".
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from pyrage import x25519


def keypair(directory: Path) -> x25519.Identity:
    path = directory / "identity.txt"
    if not path.is_file():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = x25519.Identity.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"# public key: {identity.to_public()}\n{identity}\n")
    lines = [line for line in path.read_text(encoding="ascii").splitlines() if line and not line.startswith("#")]
    return x25519.Identity.from_str(lines[0])


def main(directory: str) -> None:
    identity = keypair(Path(directory))
    recipients = {"conn_type": "generic", "extra": {"recipients": [str(identity.to_public())]}}
    secret = {"conn_type": "generic", "password": str(identity)}
    print(f"export AIRFLOW_CONN_BACKUP_AGE_RECIPIENTS={shlex.quote(json.dumps(recipients))}")
    print(f"export AIRFLOW_CONN_BACKUP_AGE_IDENTITY={shlex.quote(json.dumps(secret))}")


if __name__ == "__main__":
    main(sys.argv[1])
