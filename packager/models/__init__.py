"""Model inspection and conversion, one module per model format."""
