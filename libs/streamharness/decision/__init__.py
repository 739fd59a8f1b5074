"""Decision: per-stream state on media time; every step decides silent or respond."""
