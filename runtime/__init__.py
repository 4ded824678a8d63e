"""Giris runtime: protocol, tensor pools, transport, client SDK, embedding, config."""
from giris.runtime.aio import AsyncClient, AsyncSession
from giris.runtime.client import AudioChunk, Client, Coefficients, Event, Frame, Session
from giris.runtime.config import Config, default_config, load
from giris.runtime.embed import Runtime
from giris.runtime.errors import (BadInput, BudgetExceeded, GirisError, LimitExceeded,
                                  ProtocolError, ServerGone, SessionNotFound, StageFailed, Timeout)

__all__ = ["AsyncClient", "AsyncSession", "AudioChunk", "BadInput", "BudgetExceeded", "Client", "Coefficients", "Config", "Event",
           "Frame", "GirisError", "LimitExceeded", "ProtocolError", "Runtime", "ServerGone",
           "Session", "SessionNotFound", "StageFailed", "Timeout", "default_config", "load"]
