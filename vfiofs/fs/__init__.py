"""The pyfuse3 adapter: FUSE requests onto the core."""
