"""Run monitoring over plain metric dicts: model FLOPs and MFU, W&B, MLflow, TensorBoard.

- :mod:`.flops`: FLOPs per token from the model shape, peak FLOP/s of GPUs by name, MFU.
- :mod:`.throughput`: :class:`~.throughput.ThroughputMonitor` adds ``tflops_per_gpu`` and
  ``mfu`` to a step's metrics.
- :mod:`.dashboard`: the metric names W&B and TensorBoard show (``train/loss``, ``val/loss``).
- :mod:`.wandb_logger`, :mod:`.mlflow_logger`, :mod:`.tensorboard`: the dashboard loggers.

None of them knows the train loop: ``megatron_forge.training.monitors`` binds them to it
as callbacks. Every logger writes on global rank 0 only: the trainer all-reduces the loss
and the timing, so rank 0 holds every metric.
"""
