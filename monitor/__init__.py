"""runwatch monitor: checks every stored run for completeness, pairing, ordering, isolation and
delivery SLOs, and serves verdicts, metrics, a web UI and a JSON API."""

from __future__ import annotations
