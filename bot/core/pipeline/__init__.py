"""The request path as a chain of steps, each one concern (bolt-python's middleware list is the model).

:meth:`BotService.handle <bot.core.service.BotService.handle>` cleans the request, runs it down
:func:`steps`, and turns what a step raises into the user's ``Final``:

=================  =========================================================================================
step               its one concern
=================  =========================================================================================
``Dedup``          a redelivered event id ends here (nothing is answered); ids too long to store are refused
``Access``         the access rules (:mod:`bot.core.access`)
``Commands``       follow an addressed thread; ``help``, ``reset``, ``settings`` (:mod:`bot.core.commands`)
``Options``        the request's answer options, checked against ``[generation]``
``Pictures``       the message's pictures (and a seeded history's) counted, decoded and checked
``Conversation``   the thread's live conversation and its turns; a thread with no picture is refused
``Presets``        the question the model is asked (a preset's prompt, the user's words)
``Quota``          admitted and reserved in one transaction (:mod:`bot.core.quotas`); given back on failure
``Record``         the question and a pending answer stored, with the event id; what the model reads
``Extras``         the answer's website preview and the note of a thread cut to fit
``Store``          the streamed answer stored (done, interrupted, failed), the reservation settled
``Stream``         the answer streamed from the backend
=================  =========================================================================================

A step (:class:`~bot.core.pipeline.chain.Step`) is an async generator ``step(ctx, call_next)``: it reads
and fills the request's :class:`~bot.core.pipeline.chain.Context`, then answers (yields a ``Final`` or raises
a :class:`~bot.core.errors.BotError`) or relays ``call_next(ctx)`` inside ``aclosing`` — so a reply closed
early (the user left) closes the whole chain at once, down to the backend's request, and each step's
``finally`` runs before ``aclose()`` returns.  Every step is built from the shared
:class:`~bot.core.pipeline.chain.Parts` and can be run alone with :func:`~bot.core.pipeline.chain.chain`
(``tests/bot/test_pipeline.py``).  A new concern is a new step in :func:`steps`, not a new branch in the service.
"""

from __future__ import annotations

from bot.core.pipeline.answer import CUT_NOTE, Extras, Store
from bot.core.pipeline.chain import Context, Handler, Parts, Step, Streamed, Timing, chain
from bot.core.pipeline.command import Commands
from bot.core.pipeline.conversation import Conversation, Record
from bot.core.pipeline.guard import Access, Dedup
from bot.core.pipeline.pictures import Pictures
from bot.core.pipeline.question import Options, Presets
from bot.core.pipeline.quota import Quota
from bot.core.pipeline.stream import Stream

__all__ = [
    "CUT_NOTE",
    "Context",
    "Handler",
    "Parts",
    "Step",
    "Streamed",
    "Timing",
    "chain",
    "steps",
]


def steps(parts: Parts) -> list[Step]:
    """The request path, in order (the table above)."""
    kinds = (Dedup, Access, Commands, Options, Pictures, Conversation, Presets, Quota, Record, Extras, Store, Stream)
    return [kind(parts) for kind in kinds]
