"""Work that needs a process of its own (megatron's process group, and the CPU emulation,
which patches torch for the life of the process), batched to pay the start-up once:

    python -m tests.convert.worker convert '[["from-hf", HF_DIR, CKPT_DIR], ...]'
    python -m tests.convert.worker logits TOKENS.pt '[[CKPT_DIR, OUT.pt], ...]'
    python -m tests.convert.worker check OUT.json '[["check-serving", DIR, ...], ...]'

``convert`` runs forge-convert once per argument list and fails on the first non-zero exit.
``check`` runs forge-convert once per argument list and writes each one's exit status and
standard output to OUT.json (a list of [status, output]).
``logits`` saves each checkpoint's reference forward
(megatron_forge.convert.reference.megatron_logits: one rank, fp32, padded vocabulary
columns included) over the token ids ([batch, seq]).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(argv: list[str]) -> int:
    if argv[0] == "convert":
        from megatron_forge.convert.cli import main as convert

        for args in json.loads(argv[1]):
            code = convert(args)
            if code != 0:
                print(f"forge-convert {args} exited {code}", file=sys.stderr)
                return code
        return 0
    if argv[0] == "check":
        import contextlib
        import io

        from megatron_forge.convert.cli import main as convert

        results = []
        for args in json.loads(argv[2]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = convert(args)
            results.append([code, out.getvalue()])
        with open(argv[1], "w") as f:
            json.dump(results, f)
        return 0
    from megatron_forge.convert.reference import megatron_logits

    tokens = torch.load(argv[1])
    for ckpt_dir, out in json.loads(argv[2]):
        torch.save(megatron_logits(ckpt_dir, tokens), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
