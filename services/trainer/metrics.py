"""Prometheus metrics of the trainer."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROUNDS = Counter("cnei_federated_rounds_total", "Federated rounds by outcome (ok | failed)",
                 ["model", "outcome"])
ROUND_SECONDS = Histogram("cnei_federated_round_duration_seconds", "Wall time of one federated round",
                          buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
PARTICIPANTS = Histogram("cnei_federated_round_participants", "Clients whose update a round aggregated",
                         buckets=(1, 2, 3, 4, 5, 8, 10, 16, 32, 64))
GLOBAL_ACCURACY = Gauge("cnei_federated_global_accuracy", "Held-out accuracy of the latest global model",
                        ["model"])
UPDATE_BYTES = Counter("cnei_federated_update_bytes_total", "Weight bytes moved to and from clients",
                       ["direction"])
CLIENT_FAILURES = Counter("cnei_federated_client_failures_total", "Client calls that gave no usable update",
                          ["reason"])
JOBS = Counter("cnei_federated_jobs_total", "Federated jobs by final state", ["model", "state"])
TRANSIENT_ERRORS = Counter("cnei_federated_job_transient_errors_total",
                           "Redis or registry trouble met by federated jobs, by what the trainer did "
                           "(retried | suspended)", ["model", "action"])
