"""Benchmarks: each reports a measured rate beside a ceiling measured in the same run."""
