"""The publisher side of OTA: a static TUF repository of releases that devices pull from.

``packager.agent`` is the device side; both agree on the layout in :mod:`packager.ota.layout`.
"""
