"""The index database: studies, series, instances, jobs, deliveries, and its migrations."""
