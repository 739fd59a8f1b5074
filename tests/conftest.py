"""Shared fixtures. Real servers (Kafka broker, tritonserver) start once per test session, in
the plugin modules below, and only when a test asks for them."""

pytest_plugins = [
    "tests.fixtures_kafka",
    "tests.fixtures_triton",
    "tests.fixtures_generation",
]
