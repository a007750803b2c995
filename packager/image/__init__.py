"""Daemonless, reproducible OCI images: Debian base from real apt, wheels, file layers."""
