"""Foreign SAE formats: import from and export to SAELens and sparsify, mapping every convention exactly
or refusing."""
