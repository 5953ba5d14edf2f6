"""Benchmarks (core, no Qt): the shared protocols of ``../shared/PROTOCOL.md``.

* :mod:`.protocol` - section 1, k-slice propagation (one round of the simulated
  clinician) with the classical baselines, and the shared scoring helpers.
* :mod:`.loop` - section 2, the whole correction loop (many rounds).
* :mod:`.cases` - the benchmark cases (shared real CTs, phantoms).

The CLI (``propseg bench ...``) is a thin shim over these modules.
"""
