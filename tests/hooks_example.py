"""Source hooks named by recipes in the tests (source.filter / source.map as module:function)."""


def long_enough(record: dict) -> bool:
    return len(record["text"].split()) >= 20


def shout(record: dict) -> dict:
    if "explode" in record:
        raise ValueError("boom")
    return {**record, "text": record["text"].upper()}


def die_once_at(record: dict) -> dict:
    """Kill this producer (exit without a word) at record id $RINGLOAD_TEST_DIE_AT, the first time only."""
    import os

    marker = os.environ.get("RINGLOAD_TEST_DIE_MARKER")
    if marker and str(record.get("id")) == os.environ.get("RINGLOAD_TEST_DIE_AT") and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return record
