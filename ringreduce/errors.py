"""The one exception type ringreduce raises."""


class RingReduceError(RuntimeError):
    """An error in a collective: bad input, ranks that disagree, a timeout.

    The message names the rank that raised it and, where there is one, the tensor.
    """
