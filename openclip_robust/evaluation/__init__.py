"""Evaluation: the suite (zero-shot, OOD, retrieval), RSA, WiSE-FT, prompt modules, results tables."""
