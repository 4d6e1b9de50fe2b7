"""Events (DESIGN §5): the scripts append them to each shard's events stream; this package
delivers them.

- ``notifier.Notifier`` reads every shard's stream with one consumer group per webhook
  URL (``quotagate-notify:<hash of the URL>``) and POSTs each event, HMAC-signed, to it
  (retries with backoff, then the dead-letter stream). At least once.
- ``hub.EventHub`` is the in-process fan-out for the gRPC streams (WatchEvents,
  WatchStatus): plain XREAD from "$", so every server process sees every new event.
"""

from quotagate.events.hub import EventHub, hub_for
from quotagate.events.model import EVENT_TYPES, Event
from quotagate.events.notifier import GROUP, Notifier, NotifierOptions
from quotagate.events.webhook import sign, verify

__all__ = ["EVENT_TYPES", "GROUP", "Event", "EventHub", "Notifier", "NotifierOptions",
           "hub_for", "sign", "verify"]
