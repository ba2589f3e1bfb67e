"""Every random draw of a run is seeded by (run seed, step, stream), never by a stateful generator, so a
run resumed at step k (or laid out over other ranks) draws exactly what an uninterrupted run draws.

Streams: prompt index >= 0 (the engine's sampling seed of that prompt; 0 also draws the step's problems);
-1 mini-batch order; -2 - dp_rank verifier example selection; -3 SFT problems; -4 - dp_rank SFT corruptions.
"""


def step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + stream) % (1 << 31)
