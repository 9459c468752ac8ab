"""Embedding: tiles to tokens (compute), a plate's sites to a store (plate), the activation store (store) and the same on a Dask cluster (cluster)."""
