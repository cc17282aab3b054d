"""The run-time: run directories, the step loop, evaluation, checkpoints, metrics, devices and preemption."""
