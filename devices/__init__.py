"""Bundled device definitions; installed as the ``vfiofs.devices`` package so the CLI can find them."""
