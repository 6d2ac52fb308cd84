"""Layer 2, liveness: stall inspector, exit notices, deadlock detection and fault hooks.

They plug into the supervised wait (transport.wait.Supervisor) as callbacks; the
wait never imports them.
"""
