"""Prefect flows: thin orchestration over decapflow's library functions."""
