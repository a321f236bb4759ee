"""Monitors turn activations (or sampled token ids) into per-token scores and a firing decision."""
