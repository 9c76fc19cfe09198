"""Metrics, health and logs that operators watch."""
