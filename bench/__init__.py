"""End-to-end benchmark of the service: python -m bench."""
