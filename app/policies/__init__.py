"""Policies over several models, built on the data plane: `model=auto` (routing) and cascades."""
