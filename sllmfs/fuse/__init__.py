"""The read-only FUSE view: the store shown as ordinary Hugging Face model folders.

``tree`` maps the store to inodes (no FUSE), ``ops`` answers the kernel,
``storeio`` reads partitions without double caching, ``mount`` owns the mount
point's lifecycle and ``serve`` ties them together. The safetensors layout
itself is ``sllmfs.fuse.synth``.
"""
