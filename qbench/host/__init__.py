"""The machine qbench runs on and its files: environment fingerprint, llama.cpp build flags, cache
folders, atomic writes and locks, plugin entry points.
"""
