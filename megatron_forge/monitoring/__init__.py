"""Run monitoring: model FLOPs and MFU, W&B and TensorBoard as train-loop callbacks.

- :mod:`.flops`: FLOPs per token from the model shape, peak FLOP/s of GPUs by name, MFU.
- :mod:`.throughput`: :class:`~.throughput.ThroughputMonitor` adds ``tflops_per_gpu`` and
  ``mfu`` to each step's metrics before they are written.
- :mod:`.dashboard`: the metric names W&B and TensorBoard show (``train/loss``, ``val/loss``).
- :mod:`.wandb_logger`, :mod:`.tensorboard`: the two dashboard callbacks.

Every logger writes on global rank 0 only: the trainer all-reduces the loss and the
timing, so rank 0 holds every metric.
"""
