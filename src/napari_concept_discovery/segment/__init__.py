"""Segmentation: nuclei and cells per site (classical, Cellpose, legacy), the quality table (qc) and a whole plate's label files (plate)."""
