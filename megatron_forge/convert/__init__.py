"""Checkpoint conversion: megatron torch_dist <-> Hugging Face, TensorRT-LLM checkpoints,
serving checks. Entry point: ``forge-convert`` / ``python tools/convert_checkpoint.py``."""
