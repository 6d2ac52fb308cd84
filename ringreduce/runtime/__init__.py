"""Layer 5, runtime: contexts, agreement, the collectives (validate -> agree -> dispatch),
the engine thread and init, the only place that wires the layers together."""
