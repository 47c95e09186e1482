"""imagefs: an OpenStack-Glance-style image catalog served as a FUSE filesystem."""

__version__ = "0.1.0"
