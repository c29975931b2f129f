"""Suite files to validated specs to planned cells: parsing (config), the cell key and plan (plan),
cell ids (identity), CI sharding (shard).
"""
