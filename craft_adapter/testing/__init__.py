"""Test doubles for tests and benchmarks (fake vendors, the import guard); never imported by shipped code."""
