"""Layer 0, core: errors, logging, configuration, the dtype table, ops, array modules, the timeline.

Nothing here communicates; every other layer builds on these modules.
"""
