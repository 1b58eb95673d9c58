"""The sidecar daemon: memory tier, fill, socket server and start-up.

One module per concern (framing and messages live in ``sllmfs.protocol``): ``memtier``
(segments, budget, LRU), ``fill`` (parallel verified reads from the store),
``disktier`` (SSD budget), ``cache`` (residency, fills, refusals, disk loop, GPU pins),
``registry`` (registered.json), ``gpucopy`` (copies into clients' GPU tensors),
``ops`` (one method per protocol op), ``status`` (the status dict), ``server`` (socket,
peer credentials, framing, dispatch), ``daemon`` (settings, logging, signals, mount).
Protocol: docs/protocol.md.
"""
