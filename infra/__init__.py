"""Infrastructure both sides of robust-jem share, and nothing else: atomic files, result rows, provenance,
seeds, the energy formula, the input-error type.

``robust_jem`` (the model side) and ``attacks`` (the attack side) both import this package; it imports
neither of them.
"""
