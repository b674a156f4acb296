import asyncio

import numpy as np

from gateway.inference.embedded import MicroBatcher


def test_concurrent_submits_merge_into_one_run_and_split_back() -> None:
    runs: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        runs.append(len(x))
        return x[:, 0] * 2

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(run, max_batch_rows=1000, max_delay_s=0.01)
        parts = [np.full((n, 3), float(n), np.float32) for n in (1, 2, 3)]
        out = await asyncio.gather(*(b.submit(p) for p in parts))
        b.close()
        return out

    out = asyncio.run(main())
    assert runs == [6]
    assert [o.tolist() for o in out] == [[2.0], [4.0, 4.0], [6.0, 6.0, 6.0]]


def test_full_batch_flushes_without_waiting_for_the_delay() -> None:
    runs: list[int] = []

    async def main() -> float:
        b = MicroBatcher(
            lambda x: (runs.append(len(x)), x[:, 0])[1], max_batch_rows=4, max_delay_s=5.0
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(b.submit(np.ones((2, 1))), b.submit(np.ones((2, 1))))
        b.close()
        return loop.time() - t0

    assert asyncio.run(main()) < 1.0
    assert runs == [4]


def test_a_failing_run_fails_every_caller_of_its_batch() -> None:
    from gateway.errors import InferenceError

    def boom(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("bad batch")

    async def main() -> list:
        b = MicroBatcher(boom, max_batch_rows=100, max_delay_s=0.001)
        out = await asyncio.gather(
            b.submit(np.ones((1, 1))), b.submit(np.ones((1, 1))), return_exceptions=True
        )
        b.close()
        return out

    out = asyncio.run(main())
    assert all(isinstance(e, InferenceError) for e in out)
