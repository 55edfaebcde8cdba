"""The node agent: change tracking, the sync scheduler, metrics and health (issue: the node agent)."""
