"""Layer 3, policy: the cost model, the tuning file and the plan that "auto" follows."""
