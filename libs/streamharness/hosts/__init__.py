"""Hosts run stages (:mod:`streamharness.stage`): :mod:`.kafka` in a service, :mod:`.local` in one process."""
