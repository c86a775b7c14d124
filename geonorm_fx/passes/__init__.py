"""The compiler pass: op vocabulary (ops), normalization finder (norms), residual-site analysis (sites),
graph rewrite (rewrite)."""
