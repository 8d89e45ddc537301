"""The service: everything ``dicom-dispatch serve`` assembles, in one package (architecture §2.2).

* ``serve.py``          the whole service in one process: server, deployments, loops, executor
* ``api.py``            the environment set before Prefect is imported, and which API is used
* ``database.py``       the embedded PostgreSQL: its URL, stale lock files, its stop
* ``server.py``         the embedded ``prefect server start`` child; ``supervisor.py`` restarts it
* ``api_auth.py``       the API's auth string; ``encryption_key.py`` the block-secret key file
* ``stop_budget.py``    SIGTERM to exit within the stop budget, Prefect's queues included
* ``dispatchers.py``    the dispatcher loop with its settings refresh, ``--workers`` children
  (``dispatcher_child.py``)
* ``periodic_services.py``  the loops beside the dispatcher: ``cleaner_service.py``,
  ``metrics_endpoint.py`` (endpoint and sampler), ``slot_audit.py``; ``history_vacuum.py``
  configures Prefect's own vacuum
* ``background.py``, ``query.py``  a background executor, or only the query/retrieve
  deployments, on a host of their own (``python -m deployments.background_service`` and
  ``python -m deployments.query_service`` are kept for them)
* ``log.py``            the service's own log lines on stderr

Imports nothing: ``serve`` decides the environment before Prefect is imported.
"""
