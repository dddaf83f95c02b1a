"""The node agent: connects to the scheduler as a worker and runs jobs on a pluggable engine."""
