"""Prefect flows of medflow, and its command line (entry point: :mod:`medflow.flows.entry`)."""
