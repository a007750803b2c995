"""Thin click commands, one module per command (group); registered in ``packager.cli``."""
