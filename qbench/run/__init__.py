"""Running a plan: the typed job, executors (local, Ray), the child process and its memory sampler,
the worker, run summaries, install checks (doctor).
"""
