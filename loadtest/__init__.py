"""Locust load tests with SLO gates."""
