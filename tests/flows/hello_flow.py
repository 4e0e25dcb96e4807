"""A tiny flow for the served-deployment test (`sla deploy --entrypoint tests/flows/hello_flow.py:hello`)."""

from prefect import flow, task


@task(timeout_seconds=60)
def greet(name: str) -> str:
    return f"hello {name}"


@flow(name="sla-hello")
def hello(name: str = "sla") -> str:
    return greet(name)
