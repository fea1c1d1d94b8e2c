"""Integrations with evaluation harnesses (each imports its harness only when used)."""
