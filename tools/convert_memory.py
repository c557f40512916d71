"""Peak memory of checkpoint conversion against model size (the README's figure).

Builds a randomly initialised transformers LlamaForCausalLM (about 1 GB in fp32 by
default), saves it with save_pretrained, then runs forge-convert from-hf (HF -> torch_dist),
to-hf (torch_dist -> HF) and to-trtllm --tp 2 as separate processes and reports each
one's peak RSS (the kernel's ru_maxrss for that process), next to a process that only
imports the converter (the Python + torch + megatron-core + transformers baseline). The model is built
in a child process too: this one stays small, because a child's ru_maxrss includes the
parent's memory it was forked from.

    python tools/convert_memory.py                # 16 layers, 938 MB
    python tools/convert_memory.py --layers 48    # 2314 MB: the peak stays put
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import megatron_forge.convert.cli, megatron_forge.convert.hf, "
    "megatron_forge.convert.from_hf, megatron_forge.convert.writer, transformers"
)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``cmd`` run as a child process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB


def build_model(out: Path, args: argparse.Namespace) -> float:
    """Save a random Llama with our sample tokenizer; return its weights' size in MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_forge.data.tokenizer import load_tokenizer

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), max_shard_size="300MB")
    load_tokenizer(args.tokenizer).save_pretrained_files(out)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/convert_memory"))
    parser.add_argument("--tokenizer", default=str(REPO / "data/sample/tokenizer.model"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf, ckpt, back, trt = (args.work_dir / n for n in ("hf", "ckpt", "hf_again", "trt"))
    if args.build_only:
        print(build_model(hf, args))
        return
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    build = subprocess.run(
        [sys.executable, *sys.argv, "--build-only"], check=True, capture_output=True, text=True
    )
    size_mb = float(build.stdout.split()[-1])
    convert = [sys.executable, "tools/convert_checkpoint.py"]
    rows = [
        ("imports only", *peak_rss_mb([sys.executable, "-c", IMPORTS])),
        ("from-hf", *peak_rss_mb([*convert, "from-hf", str(hf), str(ckpt)])),
        ("to-hf", *peak_rss_mb([*convert, "to-hf", str(ckpt), str(back)])),
        ("to-trtllm", *peak_rss_mb([*convert, "to-trtllm", str(ckpt), str(trt), "--tp", "2"])),
    ]
    print(f"model: {size_mb:.0f} MB of fp32 weights ({args.layers} layers, hidden {args.hidden})")
    for name, rss, seconds in rows:
        print(f"{name:>12}: peak RSS {rss:6.0f} MB  ({rss / size_mb:.2f} x model)  {seconds:.0f}s")
    shutil.rmtree(args.work_dir)


if __name__ == "__main__":
    main()
