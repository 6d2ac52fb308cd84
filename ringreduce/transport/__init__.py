"""Layer 1, transport: channels, point-to-point primitives, the supervised wait, shared windows,
node topology and pinned-host staging of device buffers."""
