"""A simulated serving engine that reuses KV blocks of shared prompt prefixes.

    python examples/prefix_server.py
    python examples/prefix_server.py --loop uvloop --backend threads --concurrency 64

Each request is one turn of a conversation.  Its prompt is a system prompt
(shared by many conversations) followed by every earlier turn and the new
one, cut into token blocks; a block's key is the hash of its parent's key and
its own tokens, so equal prefixes give equal keys, as in vLLM and SGLang.

A request loads the longest stored prefix of its blocks with ``get_prefix``,
"computes" the rest (fills them with bytes derived from the key) and stores
those with ``put_many``, while the other clients do the same.  A
conversation's next turn starts only after its previous turn has finished,
like a user waiting for the reply.

Checks, each of which makes the program exit 1: every loaded block holds the
bytes its key implies; every block stored before a request started is found
by it; no block fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import struct
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvuring import BlockStore, Status, aligned_buffer

TOKENS_PER_BLOCK = 16
SYSTEM_PROMPTS = 4
SYSTEM_PROMPT_BLOCKS = 6
TURNS = 8
MAX_BLOCKS_PER_TURN = 3
VOCAB = 32000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--backend",
        choices=("auto", "uring", "threads"),
        default=None,
        help="I/O engine (default: $KVURING_BACKEND, else auto)",
    )
    parser.add_argument("--requests", type=int, default=320, help="requests to serve (default 320)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="clients sending requests at once (default 32)"
    )
    parser.add_argument(
        "--block-size", type=int, default=64 << 10, help="bytes per KV block (default 64 KiB)"
    )
    parser.add_argument(
        "--dir", default=".", help="make the temporary store under this directory (default .)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for the simulated prompts")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.block_size) <= 0:
        parser.error("--requests, --concurrency and --block-size must be positive")
    return args


# ----------------------------------------------------------------------------
# the simulated workload
# ----------------------------------------------------------------------------


def token_block(rng: random.Random) -> bytes:
    return struct.pack(
        f"<{TOKENS_PER_BLOCK}I", *(rng.randrange(VOCAB) for _ in range(TOKENS_PER_BLOCK))
    )


def chain_keys(blocks: Sequence[bytes], parent: bytes = b"") -> list[bytes]:
    """Each block's key hashes its parent's key with its tokens: a key names a whole prefix."""
    keys = []
    for tokens in blocks:
        parent = hashlib.sha256(parent + tokens).digest()
        keys.append(parent)
    return keys


@dataclass
class Conversation:
    keys: list[bytes]  #: block keys of the full conversation, system prompt first
    turn_ends: list[int]  #: how many blocks the prompt of each turn has
    done: list[asyncio.Event] = field(default_factory=list)


def make_conversations(count: int, rng: random.Random) -> list[Conversation]:
    systems = [
        [token_block(rng) for _ in range(SYSTEM_PROMPT_BLOCKS)] for _ in range(SYSTEM_PROMPTS)
    ]
    conversations = []
    for _ in range(count):
        blocks = list(rng.choice(systems))
        ends = []
        for _turn in range(TURNS):
            blocks += [token_block(rng) for _ in range(rng.randint(1, MAX_BLOCKS_PER_TURN))]
            ends.append(len(blocks))
        conversations.append(Conversation(chain_keys(blocks), ends))
    return conversations


def schedule(
    conversations: list[Conversation], requests: int, rng: random.Random
) -> list[tuple[int, int]]:
    """(conversation, turn) pairs, turn by turn, conversations shuffled within a turn."""
    order: list[tuple[int, int]] = []
    for turn in range(TURNS):
        ids = list(range(len(conversations)))
        rng.shuffle(ids)
        order += [(c, turn) for c in ids]
    return order[:requests]


def kv_bytes(key: bytes, size: int) -> bytes:
    """What the "model" computes for a block: a pattern that only this key gives."""
    return (key * (size // len(key) + 1))[:size]


# ----------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------


@dataclass
class Results:
    get_ms: list[float] = field(default_factory=list)
    request_ms: list[float] = field(default_factory=list)
    requested: int = 0
    loaded: int = 0
    expected: int = 0
    statuses: dict[Status, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class PrefixServer:
    def __init__(self, store: BlockStore, conversations: list[Conversation]) -> None:
        self.store = store
        self.conversations = conversations
        self.size = store.block_size
        #: keys whose put has returned STORED or EXISTS: present on disk from then on
        self.stored: set[bytes] = set()
        self.results = Results()

    async def client(self, queue: asyncio.Queue[tuple[int, int]], region: memoryview) -> None:
        rows = [region[i : i + self.size] for i in range(0, len(region), self.size)]
        try:
            while True:
                try:
                    conv_id, turn = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                conv = self.conversations[conv_id]
                if turn:
                    await conv.done[turn - 1].wait()
                try:
                    await self.serve(conv.keys[: conv.turn_ends[turn]], rows)
                finally:
                    conv.done[turn].set()
        finally:
            for row in rows:
                row.release()

    async def serve(self, keys: list[bytes], rows: list[memoryview]) -> None:
        res = self.results
        bufs = rows[: len(keys)]
        # Everything stored before this request started must be found by it.
        expected = 0
        while expected < len(keys) and keys[expected] in self.stored:
            expected += 1

        start = time.perf_counter()
        hits = await self.store.get_prefix(keys, bufs)
        loaded_at = time.perf_counter()

        for key, buf in zip(keys[:hits], bufs):
            if buf != kv_bytes(key, self.size):
                res.errors.append(f"block {key.hex()[:16]} loaded with the wrong bytes")
        if hits < expected:
            res.errors.append(f"found {hits} prefix blocks, but {expected} were stored")

        # Prefill the rest, then offload it for the next request that shares it.
        for key, buf in zip(keys[hits:], bufs[hits:]):
            buf[:] = kv_bytes(key, self.size)
        statuses = await self.store.put_many(keys[hits:], bufs[hits:])
        done_at = time.perf_counter()

        for key, status in zip(keys[hits:], statuses):
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if status in (Status.STORED, Status.EXISTS):
                self.stored.add(key)
            else:
                res.errors.append(f"block {key.hex()[:16]}: put gave {status.value}")
        res.get_ms.append((loaded_at - start) * 1e3)
        res.request_ms.append((done_at - start) * 1e3)
        res.requested += len(keys)
        res.loaded += hits
        res.expected += expected


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return "  ".join(f"{rank(q):7.2f}" for q in (0.5, 0.9, 0.99)) + f"  {ordered[-1]:7.2f}"


async def serve_all(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    count = -(-args.requests // TURNS)
    conversations = make_conversations(count, rng)
    for conv in conversations:
        conv.done = [asyncio.Event() for _ in range(TURNS)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for item in schedule(conversations, args.requests, rng):
        queue.put_nowait(item)

    clients = min(args.concurrency, args.requests)
    max_blocks = max(conv.turn_ends[-1] for conv in conversations)
    # One aligned staging region for all clients, a slice of rows each.
    per_client = max_blocks * args.block_size
    staging = aligned_buffer(per_client * clients)
    region = memoryview(staging)

    with tempfile.TemporaryDirectory(prefix="kvuring-prefix-", dir=args.dir) as root:
        async with BlockStore(root, args.block_size, backend=args.backend) as store:
            server = PrefixServer(store, conversations)
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    server.client(queue, region[i * per_client : (i + 1) * per_client])
                    for i in range(clients)
                )
            )
            wall = time.perf_counter() - start
            stats = store.stats()

    region.release()
    staging.close()
    res = server.results
    served = len(res.request_ms)
    print(
        f"{served} requests from {clients} clients over {len(conversations)} conversations; "
        f"engine {stats['engine']}, loop {args.loop}, block {args.block_size} bytes"
    )
    print(f"wall {wall:.2f} s, {served / wall:.0f} requests/s")
    put_counts = ", ".join(f"{n} {s.value}" for s, n in sorted(res.statuses.items(), key=str))
    print(
        f"blocks: {res.requested} requested, {res.loaded} loaded from the store "
        f"({res.loaded / max(res.requested, 1):.1%} hit rate; {res.expected} were known stored "
        f"when their request began); computed and offloaded: {put_counts or 'none'}"
    )
    print(f"latency ms     {'p50':>7}  {'p90':>7}  {'p99':>7}  {'max':>7}")
    print(f"get_prefix     {percentiles(res.get_ms)}")
    print(f"request        {percentiles(res.request_ms)}")
    print("stats:", json.dumps(stats, indent=2))
    if res.errors:
        print(f"FAILED: {len(res.errors)} problems, first: {res.errors[0]}", file=sys.stderr)
        return 1
    return 0


def run(main: Coroutine[Any, Any, int], loop_name: str) -> int:
    """Run ``main`` to completion on a fresh asyncio or uvloop event loop."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(run(serve_all(arguments), arguments.loop))
