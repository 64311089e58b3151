"""Training medflow's encoders on the archive itself (plain PyTorch, no Prefect)."""
