"""A toy qbench plugin: the ``toy`` backend (a byte-bigram model whose logit table is quantized
to 8 or 4 bits) and the ``toy_xent`` metric. It exists to prove that a backend and a metric
can be added from outside the qbench package, through entry points alone."""
