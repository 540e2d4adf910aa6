"""FastStream side of ferrostream's Kafka benchmark (benches/kafka.rs runs this, one mode per process).

Prints one JSON line with the same fields the Rust contenders print:
  {"n": ..., "secs": ..., "cpu_secs": ..., "peak_rss_kb": ...}
The clock runs from the first message handled (or the first publish) to the n-th, like the Rust side.

  python3 benches/faststream_bench.py --mode ack --bootstrap 127.0.0.1:9092 --topic t --count 10000 --group g

Needs `pip install 'faststream[kafka]==0.7.8'` (scripts/bench.sh installs it).
"""

import argparse
import asyncio
import json
import resource
import time

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage

PAYLOAD = b"x" * 100


class Window:
    """First and n-th event: wall clock and process CPU time."""

    def __init__(self, n):
        self.n = n
        self.count = 0
        self.start = None
        self.cpu_start = None
        self.done = asyncio.Event()

    def tick(self, k=1):
        if self.start is None:
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()
        self.count += k
        if self.count >= self.n and not self.done.is_set():
            self.secs = time.perf_counter() - self.start
            self.cpu = time.process_time() - self.cpu_start
            self.done.set()

    def report(self):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"n": self.count, "secs": self.secs, "cpu_secs": self.cpu, "peak_rss_kb": rss}), flush=True)


async def consume(args):
    broker = KafkaBroker(args.bootstrap, logger=None)
    window = Window(args.count)
    common = dict(group_id=args.group, auto_offset_reset="earliest")

    if args.mode == "ack_first":
        @broker.subscriber(args.topic, ack_policy=AckPolicy.ACK_FIRST, **common)
        async def handle(body: str):
            window.tick()
    elif args.mode == "ack":
        @broker.subscriber(args.topic, ack_policy=AckPolicy.ACK, **common)
        async def handle(body: str):
            window.tick()
    elif args.mode == "manual":
        @broker.subscriber(args.topic, ack_policy=AckPolicy.MANUAL, **common)
        async def handle(body: str, msg: KafkaMessage):
            await msg.ack()
            window.tick()
    elif args.mode == "batch":
        @broker.subscriber(args.topic, ack_policy=AckPolicy.ACK, batch=True, max_records=500, **common)
        async def handle(bodies: list[str]):
            window.tick(len(bodies))
    else:
        raise SystemExit(f"unknown consumer mode {args.mode}")

    await broker.start()
    await window.done.wait()
    await broker.stop()
    window.report()


async def publish(args):
    # The same guarantee ferrostream's producer gives (idempotent, acks=all); FastStream's default is acks=1.
    broker = KafkaBroker(args.bootstrap, logger=None, acks="all", enable_idempotence=True)
    await broker.start()
    window = Window(args.count)
    if args.mode == "publish":
        for _ in range(args.count):
            if window.start is None:
                window.tick(0)
            await broker.publish(PAYLOAD, args.topic)
            window.tick()
    elif args.mode == "publish_batch":
        window.tick(0)
        # aiokafka caps one batch at max_batch_size (16 KiB by default): 100 records of 100 bytes fit.
        chunk = 100
        sent = 0
        while sent < args.count:
            k = min(chunk, args.count - sent)
            await broker.publish_batch(*([PAYLOAD] * k), topic=args.topic)
            sent += k
            window.tick(k)
    await broker.stop()
    window.report()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True,
                   choices=["ack_first", "ack", "manual", "batch", "publish", "publish_batch"])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--group", default="faststream-bench")
    args = p.parse_args()
    asyncio.run(publish(args) if args.mode.startswith("publish") else consume(args))


if __name__ == "__main__":
    main()
