"""Prometheus metrics. With several receiver processes, ``imx serve`` sets
PROMETHEUS_MULTIPROC_DIR before this module is first imported, and /metrics aggregates."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECEIVED = Counter("imx_instances_received_total", "Instances received, by partner and door", ["partner", "door"])
STORED = Counter("imx_instances_stored_total", "Instances acknowledged as stored, by where they went", ["partner", "location"])
DUPLICATES = Counter("imx_instances_duplicate_total", "Instances already stored, answered Success", ["partner"])
REJECTED = Counter("imx_instances_rejected_total", "Instances refused, by partner and reason", ["partner", "reason"])
OUT_OF_RESOURCES = Counter("imx_out_of_resources_total", "Instances refused because neither store nor spool could take them")
STORE_FAILURES = Counter("imx_object_store_failures_total", "Object-store writes that failed and went to the spool")
QUARANTINED = Counter("imx_instances_quarantined_total", "Instances stored but held back for burned-in annotation", ["partner"])
SPOOL_DRAINED = Counter("imx_spool_drained_total", "Spooled objects moved to the object store")
ASSOC_REJECTED = Counter("imx_associations_rejected_total", "Associations rejected, by reason", ["reason"])
INGEST_SECONDS = Histogram(
    "imx_ingest_seconds",
    "Time from a complete dataset to its durable acknowledgement",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
