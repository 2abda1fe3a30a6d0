"""Everything of the service but the model and the batcher: what one worker holds and does
(``core``, which joins the model and the batcher), its errors, settings, HTTP protocol and
middleware, metrics, logs, the task store and runner, webhooks, and the gunicorn workers'
helpers (siblings, memory, the health probe). main.py puts the routes in front."""
