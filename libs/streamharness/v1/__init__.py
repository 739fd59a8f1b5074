"""Generated from protos/streamharness/v1 by tools/gen_protos.py. Do not edit."""
