"""The one exception type a user can cause (bad file, bad config, missing model, non-finite loss).

The CLI prints its message and exits with status 2; everything else is a bug and keeps its traceback.
"""


class RlscError(Exception):
    """An error in the user's input or environment, with a message naming what is wrong."""
