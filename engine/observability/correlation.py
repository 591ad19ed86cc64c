"""The correlation id of the RPC being served, for the layers below the servicer.

Set by the gRPC interceptor for the duration of each RPC (tasks the RPC starts inherit it);
empty outside an RPC. The posting engine stores it with each request's committed transfers.
"""
from __future__ import annotations

import contextvars

CORRELATION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")
