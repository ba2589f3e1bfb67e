"""Launch layouts from torchrun / Slurm variables."""

from rlv_megatron.dist import launch_env


def test_torchrun_and_slurm_layouts():
    tr = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (3, 8, 1, "n0", 1234)
    sl = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_port) == (5, 16, 1, 29500)


def test_lone_processes_do_not_share_a_port(monkeypatch):
    """Two recipes at once on one machine: a lone process (no launcher variables) takes the port free_port()
    gets from the kernel, not the launchers' fixed 29500, and the kernel never hands out a port in use. So
    while a first run holds its port (its process group's store listens there), a second gets another one:
    checked with the first port held, not left to two free ports happening to differ."""
    import socket

    from rlv_megatron import dist

    monkeypatch.setattr(dist, "free_port", lambda: 12345)
    assert dist.launch_env({}).master_port == 12345  # a lone process asks free_port()
    monkeypatch.undo()
    a = launch_env({})
    assert (a.rank, a.world_size) == (0, 1)
    with socket.socket() as first:
        first.bind((a.master_addr, a.master_port))  # free when handed out: the first run can listen there
        first.listen()
        b = launch_env({})
        assert b.master_port != a.master_port
        with socket.socket() as second:
            second.bind((b.master_addr, b.master_port))  # and the second's is free too
