"""Whole-estate recovery to one point in time, and the cross-service reference checks.

- `config`: the plan's `estate` block (schedule, window, dependency order, the references).
- `choose`: which sets recover every enabled service to a time T (pure, over the registry).
- `recover`: fetch, start scratch targets, restore in dependency order (independent services
  in parallel), tear down.
- `references`: do the restored stores agree? Counted and sampled in each direction,
  each gap explained by the capture times of the sets used.
- `report`: JSON and Markdown, skew, restore times, RTO against the tightest target.

Nothing here names a service: services come from the plan and the registry.
"""

from __future__ import annotations

DAG_ID = "dr_estate_drill"
