"""Analysis: a dictionary's codes over a store (encode, cluster), what they mean (concepts, truth, profiles), the written tables (write, analyze) and one site at a time for the viewer (explore)."""
