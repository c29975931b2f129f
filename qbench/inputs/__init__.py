"""What cells read: model sources (paths, packages, the Hugging Face hub) with content hashes, text
datasets, MMLU questions.
"""
