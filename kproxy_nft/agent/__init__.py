"""The node agent: change tracking, the sync runner, metrics and health (issue: the node agent)."""
