"""Fault and abuse suite: the real daemon, driven as a subprocess, against bad input, hostile
requests, a hostile environment, dead neighbours and crashes.

Each *session* starts the daemon (one or more times) on a fresh directory tree, drops
simulated groups in, and yields one or more table *rows*. A row counts the groups dropped
in, those that reached the row's goal, those stopped (quarantined/failed) with a reason,
the lost ones (neither at the goal nor stopped with a reason, or missing from the queue)
and the duplicated ones (two 'ok' runs of one stage, two products of a kind, two queue groups
for one set of files), plus the alerts the daemon raised about them.

``python tests/faults/run.py`` prints the table; ``tests/test_faults.py`` runs the same
sessions under pytest (marked slow).
"""
