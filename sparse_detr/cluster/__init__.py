"""Cluster work on Slurm through submitit (the engine detection research uses): a sweep as a job array with
one task per run, a report job after it, one training over several nodes; requeue on preemption and time
limits; and a sweep's status from its run folders and the scheduler.

:mod:`~sparse_detr.cluster.scheduler` asks Slurm (sinfo, squeue, sacct), :mod:`~sparse_detr.cluster.tasks`
is what the jobs run, :mod:`~sparse_detr.cluster.submit` submits them, :mod:`~sparse_detr.cluster.status`
says where a sweep stands.
"""

from sparse_detr.cluster.scheduler import ClusterError
from sparse_detr.cluster.status import cluster_sweep_status
from sparse_detr.cluster.submit import Submission, submit_sweep, submit_training, wait

__all__ = ["ClusterError", "Submission", "cluster_sweep_status", "submit_sweep", "submit_training", "wait"]
