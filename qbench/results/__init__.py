"""Stored cell records: their schema and making, the store, the regression gate (compare),
statistics, exports, merging shards.
"""
