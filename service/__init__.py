"""Everything of the service but the model and the batcher: settings, HTTP protocol and
middleware, metrics, logs, the task store and runner, webhooks, and the gunicorn workers'
helpers (siblings, memory, the health probe). main.py joins them."""
