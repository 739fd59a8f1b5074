"""gRPC bootstrap: exception→status interceptor, server construction, channel options."""
