"""Launch layouts from torchrun / Slurm variables."""

from rlv_megatron.dist import launch_env


def test_torchrun_and_slurm_layouts():
    tr = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (3, 8, 1, "n0", 1234)
    sl = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_port) == (5, 16, 1, 29500)


def test_lone_processes_do_not_share_a_port():
    a, b = launch_env({}), launch_env({})
    assert (a.rank, a.world_size) == (0, 1)
    assert a.master_port != 29500 and a.master_port != b.master_port  # two recipes at once on one machine
