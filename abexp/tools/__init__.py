"""Measurements of abexp itself: throughput benchmarks, the fault-injection audit, the host-sync
auditor and the GPU check. May import every other wing; nothing imports it but the CLI."""
