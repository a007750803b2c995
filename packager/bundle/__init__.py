"""Bundle manifest, checksums and verification."""
