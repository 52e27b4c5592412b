"""Settings and the error vocabulary every layer shares; imports nothing of app."""
