"""Model-to-model passes applied around export (quantization here; more passes join as they land)."""
