"""Host-side utilities: console progress, TensorBoard metrics, image grids and PNGs."""
