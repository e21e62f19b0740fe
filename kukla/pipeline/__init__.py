"""The three stages: harvest (model → store), train (store → dictionaries), evaluate (→ report)."""
