"""Development infrastructure: real servers (Kafka broker, ...) for local runs and integration tests."""
