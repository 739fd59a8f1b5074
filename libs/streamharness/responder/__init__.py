"""The responder service: decisions in, streamed responses out (see ``service``)."""

from streamharness.responder.service import ResponderStage, ResponderSettings

__all__ = ["ResponderStage", "ResponderSettings"]
