"""SQLite connect args for `make run`: the scheduler, API server and tasks share one SQLite file,
so wait for its lock (30 s) instead of failing with "database is locked" after 5 s."""

CONNECT_ARGS = {"timeout": 30}
