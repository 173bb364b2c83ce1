"""The compressed-time soak (tests/integration/test_soak.py): clock, network, faults, sources, runner, report."""
