"""The HTTP front ends: thin adapters from requests to the data plane and back."""
