"""The management store: hybrid connections and SAS rules that the management API changes at
run time (:mod:`hybridrelay.store.base` is the interface, :mod:`hybridrelay.store.sqlite` the
embedded implementation)."""
