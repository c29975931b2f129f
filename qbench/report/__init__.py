"""Static HTML reports built from stored results (a pure function of the result files)."""
