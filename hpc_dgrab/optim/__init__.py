"""Training drivers: synchronous SGD (all-reduce), DASGD over gossip, GradAlign."""
