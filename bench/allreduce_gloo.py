"""torch.distributed all-reduce (gloo, CPU) bus bandwidth on loopback; the peer of
bench/src/bin/allreduce.rs. Prints one JSON line per size from rank 0."""
import argparse, json, os, socket, statistics, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, port, sizes, iters):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib in sizes:
        n = mib * (1 << 20) // 4
        buf = torch.arange(n, dtype=torch.float32) % 97 + rank
        dist.all_reduce(buf)  # warm-up
        times = []
        for _ in range(iters):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        if rank == 0:
            bw = 2 * (world - 1) / world * n * 4 / med / 1e9
            print(json.dumps({"impl": "torch-gloo", "world": world, "mib": mib, "seconds": med, "busbw_gbps": bw}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes-mib", default="1,16,64,256")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    sizes = [int(x) for x in a.sizes_mib.split(",")]
    mp.spawn(rank_main, args=(a.world, port, sizes, a.iters), nprocs=a.world, join=True)
