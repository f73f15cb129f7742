"""Source hooks named by recipes in the tests (source.filter / source.map as module:function)."""


def long_enough(record: dict) -> bool:
    return len(record["text"].split()) >= 20


def shout(record: dict) -> dict:
    if "explode" in record:
        raise ValueError("boom")
    return {**record, "text": record["text"].upper()}
