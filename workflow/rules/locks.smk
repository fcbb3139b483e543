# Stale locks of killed runs (rpo/locks.py): the run that holds Snakemake's lock leaves its pid beside
# it, and a later run whose lock is held only by dead runs is told the exact `--unlock` command.
import sys

from snakemake_interface_executor_plugins.settings import ExecMode

from rpo import locks

# Only the command the user typed, not the jobs that re-read this file, and not --unlock itself.
if workflow.exec_mode == ExecMode.DEFAULT and "--unlock" not in sys.argv:
    _stale = locks.stale_lock_message(sys.argv[1:])
    if _stale:
        print(_stale, file=sys.stderr)


# The lock owner record is written by the Snakefile's onstart handler (one handler per workflow).
