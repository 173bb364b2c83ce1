"""ALL-ERP backup and disaster recovery: plan, backup sets, services, offsite, retention, drills."""
