"""Embed minibatch: register a handler, submit a batch, wait, read the results."""

import anyio

import minibatch


async def main() -> None:
    mb = minibatch.Minibatch("quickstart.db")

    @mb.handler("square", concurrency=8)
    async def square(item: minibatch.Item) -> dict:
        return {"square": item.input["n"] ** 2}

    async with mb:
        batch = await mb.submit("square", [{"input": {"n": n}, "entry_id": f"n{n}"}
                                           for n in range(1000)])
        batch = await mb.wait(batch.id)
        print(batch.status, batch.metrics)
        async for result in mb.results(batch.id):
            if result.entry_id == "n999":
                print(result.entry_id, result.output)
    mb.close()


if __name__ == "__main__":
    anyio.run(main)
