"""The sidecar daemon: memory tier, fill, socket server and start-up.

One module per concern (framing lives in ``sllmfs.protocol``): ``memtier``
(segments, budget, LRU), ``fill`` (parallel verified reads from the store),
``disktier`` (SSD budget), ``server`` (trio socket server and its ops),
``daemon`` (settings, logging, signals, mount). Protocol: docs/protocol.md.
"""
