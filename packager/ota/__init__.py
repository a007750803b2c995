"""The publisher side of OTA: a static TUF repository of releases that devices pull from.

``packager.agent`` is the device side; the contract between them (layout, release facts, path
policy) is :mod:`packager.agent.protocol`, which the publisher imports.
"""
