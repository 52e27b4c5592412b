"""Peer servers that `make bench` measures the service against (not part of the product)."""
