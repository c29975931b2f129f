"""Running a plan: the typed job, executors (local, Ray), which cells share a worker (batching),
the worker processes (child) with their memory sampler and boundary channel, the worker and what
it keeps between cells (session), run summaries, install checks (doctor).
"""
