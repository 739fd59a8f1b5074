"""Gateway: the public bidirectional session API."""
