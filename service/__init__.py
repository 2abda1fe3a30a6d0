"""HTTP-side helpers for main.py: settings, metrics and middleware."""
