"""``python -m packager`` is the ``edgepack`` command."""

from __future__ import annotations

from packager.cli import main

main()
