"""The one exception type ringreduce raises, and how its messages name a rank."""


class RingReduceError(RuntimeError):
    """An error in a collective: bad input, ranks that disagree, a timeout.

    The message names the rank that raised it and, where there is one, the tensor.
    """


def who(rank) -> str:
    """How a message names a rank: an int as "rank 3"; a string (a channel's label) as is."""
    return rank if isinstance(rank, str) else f"rank {rank}"
