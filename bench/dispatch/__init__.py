"""The parts of the dispatch benchmark; ``python -m bench.dispatch_bench`` runs them.

``config`` (sizes and targets), ``data`` (the cases), ``dcmsend`` (mercure's side and the
storescp peers), ``prefect_setup`` (server, blocks, limits), ``meters`` (CPU and API requests),
``report`` (the figures), and one module per figure: ``figure_a``, ``figure_b``, ``figure_c``.
Heavy imports (Prefect, our blocks) stay inside functions: the entry point sets Prefect's
environment before anything imports it.
"""
