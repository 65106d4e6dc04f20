"""gunicorn's settings for the notes example, read by ``python -m gunicorn -c gunicorn.conf.py``
(the ``[run] command`` in shipyard.toml).

Shipyard runs the command without a shell and hands the replica its port in ``PORT``; it must
listen on 127.0.0.1 there (the agent's router is the only client).
"""

import os

bind = f"127.0.0.1:{os.environ['PORT']}"
# One process per replica, threads for concurrency: Shipyard scales with [run] replicas.
workers = 1
worker_class = "gthread"
threads = 4
# Behind a proxy that pools keep-alive connections: keep idle ones longer than gunicorn's 2 s.
keepalive = 30
timeout = 30
graceful_timeout = 10
accesslog = None
errorlog = "-"
loglevel = "info"
