"""minibatch: an embedded batch job runner on one SQLite file.

Submit a batch of items, poll one status object, stream its results, and hear about its
end through a signed, retried webhook - in one Python process.
"""

from .app import Minibatch, run_batch
from .errors import Fail, InvalidInput, MinibatchError, NotFound, Retry
from .handlers import handler
from .models import Batch, Delivery, Item, Metrics, Result
from .upstream import anthropic_handler, openai_handler

__all__ = [
    "Batch",
    "Delivery",
    "Fail",
    "InvalidInput",
    "Item",
    "Metrics",
    "Minibatch",
    "MinibatchError",
    "NotFound",
    "Result",
    "Retry",
    "anthropic_handler",
    "handler",
    "openai_handler",
    "run_batch",
]
