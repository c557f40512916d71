"""Checkpoint conversion: the forge-convert console script, as a script.

    python tools/convert_checkpoint.py to-hf runs/tiny/checkpoints exports/tiny-hf
    python tools/convert_checkpoint.py from-hf /models/Llama-3.2-1B runs/llama1b/init --tp 2
    python tools/convert_checkpoint.py to-trtllm runs/tiny/checkpoints exports/tiny-trt --tp 2
    python tools/convert_checkpoint.py check-serving exports/tiny-hf

See megatron_forge/convert/cli.py (or --help) for every option.
"""

from __future__ import annotations

import sys

from megatron_forge.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
