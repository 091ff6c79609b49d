"""Silences FiftyOne's notice that MongoDB 6.0 is "the oldest supported
major version": the set-up installs exactly that server where no newer one
can be installed (``.ci/ensure_mongod.py``), so the notice would greet every
process with nothing for the user to do. Every other database message is
left alone."""

import logging

_OLDEST_MONGODB = "You are running the oldest supported major version of MongoDB"


class _OldestMongoDBNotice(logging.Filter):
    def filter(self, record):
        return _OLDEST_MONGODB not in record.getMessage()


def install():
    """Adds the filter to FiftyOne's database logger (once)."""
    logger = logging.getLogger("fiftyone.core.odm.database")
    if not any(isinstance(f, _OldestMongoDBNotice) for f in logger.filters):
        logger.addFilter(_OldestMongoDBNotice())
