"""What ``help()`` and an IDE show a developer of the SDK: the parameters a forwarding
method takes, and what the stream items' fields mean (their units, their clock)."""
from __future__ import annotations

import inspect

import pytest

from giris.runtime import (AsyncClient, AsyncSession, AudioChunk, Client, Coefficients, Event,
                           Frame, Runtime, Session)


@pytest.mark.parametrize("method, source", [
    (Runtime.open_session, Client.open_session), (AsyncClient.open_session, Client.open_session),
    (AsyncClient.__init__, Client.__init__), (AsyncSession.say, Session.say),
    (AsyncSession.start_say, Session.start_say), (AsyncSession.coefficients, Session.say),
    (Session.coefficients, Session.say), (Runtime.status, Client.status)])
def test_a_method_that_passes_its_keywords_on_shows_them(method, source):
    """``Runtime.open_session(avatar, **kw)`` and the asyncio twins showed ``**kw``:
    nothing of ``realtime``, ``want`` or ``size``, nor of ``say``'s ``timeout``."""
    shown = inspect.signature(method).parameters
    assert list(shown) == list(inspect.signature(source).parameters)
    assert "kw" not in shown


def test_a_forwarding_method_keeps_its_own_return_type():
    assert "AsyncSession" in str(inspect.signature(AsyncClient.open_session).return_annotation)
    assert "AsyncSpeech" in str(inspect.signature(AsyncSession.say).return_annotation)


@pytest.mark.parametrize("cls, words", [
    (AudioChunk, ("pts", "seconds", "start_sample", "sample_rate")),
    (Frame, ("pts", "index / fps", "release")),
    (Coefficients, ("first_frame + k", "names", "CHANNELS")),
    (Event, ("utterance_done", "cancelled"))])
def test_the_stream_items_say_what_their_fields_are(cls, words):
    """They were bare dataclasses: help() showed only their generated signature, so the
    unit of ``pts`` (seconds, on one clock with the audio's samples) was a guess."""
    doc = inspect.getdoc(cls) or ""
    assert not doc.startswith(cls.__name__ + "(")
    assert all(w in doc for w in words), doc
