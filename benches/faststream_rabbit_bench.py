"""FastStream side of ferrostream's RabbitMQ benchmark (benches/amqp.rs runs this, one process per run).

Consumes a queue the benchmark filled with exactly --count messages, with a FastStream 0.7.8 RabbitBroker
subscriber at least once (AckPolicy.NACK_ON_ERROR: basic.ack after the handler returns, basic.nack with
requeue on an exception, the analogue of ferrostream's NackOnError) and the given prefetch (the consuming
channel's basic.qos, FastStream's `Channel(prefetch_count=...)`). Prints one JSON line with the same fields
the Rust contenders print:
  {"n": ..., "secs": ..., "cpu_secs": ..., "peak_rss_kb": ...}
The clock runs from the first message handled to the count-th, like the Rust side.

  python3 benches/faststream_rabbit_bench.py --url amqp://guest:guest@127.0.0.1:5672/%2f --queue q \
      --count 200000 --prefetch 64

Needs `pip install 'faststream[rabbit]==0.7.8'` (scripts/bench.sh installs it).
"""

import argparse
import asyncio
import json
import resource
import time

from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue


class Window:
    """First and n-th message handled: wall clock and process CPU time."""

    def __init__(self, n):
        self.n = n
        self.count = 0
        self.start = None
        self.cpu_start = None
        self.done = asyncio.Event()

    def tick(self):
        if self.start is None:
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()
        self.count += 1
        if self.count == self.n:
            self.secs = time.perf_counter() - self.start
            self.cpu = time.process_time() - self.cpu_start
            self.done.set()

    def report(self):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"n": self.count, "secs": self.secs, "cpu_secs": self.cpu, "peak_rss_kb": rss}), flush=True)


async def consume(args):
    broker = RabbitBroker(args.url, logger=None)
    window = Window(args.count)

    # The queue exists (durable classic, declared by the benchmark); declaring it again with the same
    # settings is what FastStream does at start.
    @broker.subscriber(
        RabbitQueue(args.queue, durable=True),
        channel=Channel(prefetch_count=args.prefetch),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def handle(body: str):
        window.tick()

    await broker.start()
    await window.done.wait()
    # Waits (graceful_timeout, 15 s by default) for the running handler and its ack before closing.
    await broker.stop()
    window.report()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--prefetch", type=int, required=True)
    args = p.parse_args()
    asyncio.run(consume(args))


if __name__ == "__main__":
    main()
