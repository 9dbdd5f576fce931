"""Where users already are: TensorBoard writers (and, as optional extras, framework callbacks)."""
