"""forge-convert: checkpoint conversion between megatron-forge, Hugging Face and TensorRT-LLM.

    forge-convert to-hf CKPT_DIR OUT_DIR [--iteration N] [--dtype bf16|fp16|fp32] [--tokenizer PATH]
    forge-convert from-hf HF_DIR CKPT_DIR [--tp N --pp N --ep N]
    forge-convert to-trtllm CKPT_DIR OUT_DIR --tp N [--pp N]
    forge-convert check-serving OUT_DIR

(also ``python tools/convert_checkpoint.py ...``). Outputs are written to a temporary
directory and renamed when complete; a non-empty OUT_DIR is refused without --overwrite.
An OUT_DIR that is, contains or lies inside the input (or is or contains the run
directory the checkpoint belongs to) is always refused, and --overwrite replaces only
earlier exports: never a directory holding a training checkpoint or a run's metrics.
Checkpoints are read without running code from them (pickles are loaded with an
allowlist of types), so converting one someone shared is safe.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_forge.convert.files import parse_size
from megatron_forge.data.tokenizer import TokenizerLoadError
from megatron_forge.errors import ForgeError
from megatron_forge.utils import DTYPES


def _common(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"default: the dtype of {source}")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")


def _checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt_dir", help="checkpoint root (holds latest_checkpointed_iteration.txt)"
    )
    parser.add_argument("out_dir")
    parser.add_argument("--iteration", type=int, help="default: the latest complete one")
    parser.add_argument(
        "--tokenizer", help="tokenizer to ship and size the vocabulary; default: data.tokenizer"
    )
    _common(parser, "the checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge-convert",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="torch_dist checkpoint -> Hugging Face directory")
    _checkpoint_args(to_hf)
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> torch_dist checkpoint")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("ckpt_dir")
    helps = {
        "tp": "tensor parallelism you will train with: sets the vocabulary padding",
        "pp": "pipeline parallelism you will train with (checked against the layers)",
        "ep": "expert parallelism you will train with (checked against the experts)",
    }
    for flag, text in helps.items():
        from_hf.add_argument(f"--{flag}", type=int, default=1, help=text + " (default 1)")
    _common(from_hf, "the HF weights")

    trt = sub.add_parser("to-trtllm", help="torch_dist checkpoint -> TensorRT-LLM checkpoint")
    _checkpoint_args(trt)
    trt.add_argument("--tp", type=int, required=True, help="engine tensor parallelism")
    trt.add_argument("--pp", type=int, default=1, help="engine pipeline parallelism")

    check = sub.add_parser("check-serving", help="can vLLM / TensorRT-LLM serve OUT_DIR?")
    check.add_argument("out_dir")
    return parser


def run(args: argparse.Namespace) -> int:
    from megatron_forge.convert.serving import check_serving

    if args.command == "to-hf":
        from megatron_forge.convert.hf import export_hf

        out = export_hf(
            args.ckpt_dir,
            args.out_dir,
            args.iteration,
            args.dtype,
            args.tokenizer,
            args.overwrite,
            parse_size(args.max_shard_size),
        )
        ok, report = check_serving(out)
        print(report)
        return 0 if ok else 1
    if args.command == "from-hf":
        from megatron_forge.convert.from_hf import import_hf

        ckpt = import_hf(
            args.hf_dir, args.ckpt_dir, args.tp, args.pp, args.ep, args.dtype, args.overwrite
        )
        print(
            f"wrote {ckpt} (iteration 0, weights only). Continue pretraining with:\n"
            f"  python -m megatron_forge.train --config {ckpt}/config.yaml "
            "data.blend=[PREFIX_text_document] checkpoint.save=SAVE_DIR"
        )
        return 0
    if args.command == "to-trtllm":
        from megatron_forge.convert.trtllm import build_command, export_trtllm

        out = export_trtllm(
            args.ckpt_dir,
            args.out_dir,
            args.tp,
            args.pp,
            args.iteration,
            args.dtype,
            args.tokenizer,
            args.overwrite,
        )
        print(f"wrote {out}. Build an engine with:\n  {build_command(out, args.tp, args.pp)}")
        return 0
    ok, report = check_serving(args.out_dir)
    print(report)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # megatron-core warns when it is imported (by the conversions, lazily) that Transformer
    # Engine and apex are missing; conversion uses neither.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        return run(args)
    except (ForgeError, TokenizerLoadError) as err:
        print(f"{getattr(err, 'kind', 'error')}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
