"""Evaluating what medflow's encoders make of an archive (retrieval quality)."""
