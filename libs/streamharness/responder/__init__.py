"""The responder service: decisions in, streamed responses out (see ``service``)."""

from streamharness.responder.service import ResponderService, ResponderSettings

__all__ = ["ResponderService", "ResponderSettings"]
