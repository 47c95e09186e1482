"""Names of the extended attributes imagefs shows, shared by the daemon and the CLI."""

USER_NAMESPACE = "user."  # every xattr shown is in it; ls -l asks for others on every file
GLANCE_PREFIX = "user.glance."
STATUS = "user.imagefs.status"          # an inbox file: writing, settling, inspecting...
IMAGE_ID = "user.imagefs.id"            # an inbox file: the id its image will have
PUBLISHED = "user.imagefs.published"    # an inbox folder: recent file name -> image id
STATS = "user.imagefs.stats"            # the mount root: the daemon's counters
DAEMON = "user.imagefs.daemon"          # the mount root: store, cache, catalog, errors (JSON)
MEMBERS = "user.imagefs.members"        # an image: {project: status}; set a JSON list
LAST_ERROR = "user.imagefs.last_error"  # a folder: why the caller's last change was refused
CACHE = "user.imagefs.cache"            # an image: its cache state; set pin/unpin/drop.
                                        # The root: the whole cache (imagefs cache status)
