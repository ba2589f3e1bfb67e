"""The embedded default, on a fresh CPU machine.

Until the RL^V loop lands (issue 3) this runs the foundation demo: a Megatron policy imported from a
transformers model, a colocated vLLM engine, training steps, a bucketed weight sync that the engine
visibly follows, and an HF export. The last line printed is the path of the metrics JSON.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlv_megatron import demo  # noqa: E402

if __name__ == "__main__":  # the engine spawns processes
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_cpu"
    demo.run(out)
