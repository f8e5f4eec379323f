#!/usr/bin/env python3
"""Small load clients for the peers that Debian ships no benchmark client for.

    peer_client.py nats   --port P [--seconds S] [--size B] [--window N]
    peer_client.py rabbit --port P [--seconds S] [--size B]

Each prints one JSON object: throughput of durable publishes (acked by the server:
JetStream PubAck / RabbitMQ publisher confirm) and the round-trip latency of single
publishes, p50 and p99 in microseconds. Bounded by --seconds per phase.

These are Python clients: at these rates the client itself costs a lot of CPU on a
2-core host, so the throughput they report is a lower bound for the peer, not its limit.
"""
import argparse
import asyncio
import json
import time


def percentile(samples, q):
    if not samples:
        return 0.0
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[index] / 1000.0


async def run_nats(args):
    import nats  # nats-py

    nc = await nats.connect(f"nats://127.0.0.1:{args.port}")
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench"], storage="file")
    payload = b"x" * args.size
    # Throughput: windows of --window publishes in flight, each awaiting its PubAck.
    sent = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        await asyncio.gather(*(js.publish("bench", payload) for _ in range(args.window)))
        sent += args.window
    elapsed = time.perf_counter() - started
    # Latency: one publish at a time.
    samples = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline and len(samples) < 50_000:
        t0 = time.perf_counter_ns()
        await js.publish("bench", payload)
        samples.append(time.perf_counter_ns() - t0)
    # Consume what was written, to report the read side too.
    consumed = 0
    sub = await js.pull_subscribe("bench", durable="bench-reader")
    read_started = time.perf_counter()
    read_deadline = read_started + args.seconds
    while time.perf_counter() < read_deadline:
        try:
            messages = await sub.fetch(1000, timeout=1)
        except Exception:  # nats.errors.TimeoutError: nothing left
            break
        consumed += len(messages)
        for message in messages:
            await message.ack()
    read_elapsed = time.perf_counter() - read_started
    await nc.close()
    return {
        "produce_msgs_per_s": sent / elapsed,
        "consume_msgs_per_s": consumed / read_elapsed if read_elapsed > 0 else 0.0,
        "single_p50_us": percentile(samples, 0.50),
        "single_p99_us": percentile(samples, 0.99),
        "client": f"nats-py, {args.window} publishes in flight, acked by PubAck",
    }


def run_rabbit(args):
    import pika

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(host="127.0.0.1", port=args.port)
    )
    channel = connection.channel()
    channel.queue_declare(
        queue="bench", durable=True, arguments={"x-queue-type": "quorum"}
    )
    channel.confirm_delivery()
    payload = b"x" * args.size
    properties = pika.BasicProperties(delivery_mode=2)
    # pika's blocking channel waits for each confirm: throughput and latency coincide.
    samples = []
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        channel.basic_publish("", "bench", payload, properties, mandatory=True)
        samples.append(time.perf_counter_ns() - t0)
    elapsed = time.perf_counter() - started
    connection.close()
    return {
        "produce_msgs_per_s": len(samples) / elapsed,
        "consume_msgs_per_s": 0.0,
        "single_p50_us": percentile(samples, 0.50),
        "single_p99_us": percentile(samples, 0.99),
        "client": "pika BlockingConnection, quorum queue, one confirmed publish at a time",
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=["nats", "rabbit"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()
    if args.peer == "nats":
        result = asyncio.run(run_nats(args))
    else:
        result = run_rabbit(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
