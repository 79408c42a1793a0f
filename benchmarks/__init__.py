"""Benchmarks of odb against fixed and oracle batching (imported as ``odb.benchmarks``)."""
