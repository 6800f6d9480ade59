#!/usr/bin/env python3
"""How fast prompt pages cross between replicas (parallel.kv_transfer: jax, engine/kv_transfer.py), beside the two
other ways a page moves: a device-to-device copy (the ceiling) and a trip through host memory (what the disk tier
and the decode replica's buffer cost: device -> host, host -> device).

Two transfer servers in this process on the default backend's client (a real deployment has one per replica
process, on loopback or the network between hosts); a bfloat16 array of each size is offered by one and pulled by
the other, `--reps` times, medians reported. Synthetic data: runs on a GPU box with nothing but jax installed.

    python scripts/transfer_bench.py --mib 16 256 1024
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _median_s(fn, reps: int) -> float:
    fn()  # compile, connect
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engine.kv_transfer import TransferEndpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, nargs="+", default=[16, 256], help="array sizes in MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()})")
    server, client = TransferEndpoint("127.0.0.1:0"), TransferEndpoint("127.0.0.1:0")
    copy = jax.jit(lambda a: a + 0)
    loop = asyncio.new_event_loop()
    print(f"{'MiB':>6}{'transfer GB/s':>15}{'d2d copy GB/s':>15}{'via host GB/s':>15}{'transfer s':>12}")
    for mib in args.mib:
        n = mib * 2**20 // 2
        x = jax.device_put(jnp.arange(n, dtype=jnp.float32).astype(jnp.bfloat16), device)
        spec = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)]

        def pulled():
            uuid = server.offer((x,))
            [y] = loop.run_until_complete(client.pull(server.address, uuid, spec, timeout_s=120))
            return y

        y = pulled()
        assert np.array_equal(np.asarray(y[:1024]), np.asarray(x[:1024])), "the pulled array differs"
        t_pull = _median_s(lambda: pulled().block_until_ready(), args.reps)
        t_copy = _median_s(lambda: copy(x).block_until_ready(), args.reps)
        t_host = _median_s(lambda: jax.device_put(np.asarray(x), device).block_until_ready(), args.reps)
        gb = mib * 2**20 / 1e9
        print(f"{mib:>6}{gb / t_pull:>15.2f}{gb / t_copy:>15.2f}{gb / t_host:>15.2f}{t_pull:>12.4f}")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
