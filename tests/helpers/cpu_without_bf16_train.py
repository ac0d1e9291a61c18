"""Test-only wrapper: run the trainer on a CPU that reports no bf16 instructions (an AVX2 CPU, as torch sees it).

    python tests/helpers/cpu_without_bf16_train.py --config ... [key=value ...]

Whether this machine's CPU has AVX-512 BF16 or AMX is up to the machine; this makes the trainer's
question (torch.cpu.get_capabilities) answer no, so that the bf16 warning can be checked anywhere.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

import torch  # noqa: E402

from carbrand import train  # noqa: E402

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


def main() -> int:
    torch.cpu.get_capabilities = lambda: AVX2
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
