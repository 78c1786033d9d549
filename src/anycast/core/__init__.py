"""Pieces every Anycast role shares: errors, configuration, names, HTTP plumbing."""
