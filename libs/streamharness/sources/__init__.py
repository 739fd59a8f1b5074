"""Pulled sources: a stream opened with a source URL (RTSP, RTMP, HLS, an http(s) video file) or an
uploaded file instead of pushed frames. Ingest owns pulling: one :class:`Puller` per stream, in
the ingest replica serving that session's IngestFrames call.

- :func:`check_url` / :func:`redact`: which URLs may be pulled (:mod:`.policy`);
- :class:`Puller`: open, decode, sample to the decision rate on media time, reconnect (:mod:`.puller`);
- :class:`UploadSpool`, :func:`probe`, :class:`PullSlots`: uploads on disk and the per-replica
  limits (:mod:`.uploads`);
- :class:`SourceSettings`: every ``SH_SOURCE_*`` setting (:mod:`.settings`).
"""

from streamharness.sources.policy import check_url, classify, redact
from streamharness.sources.puller import Puller, rpc_code
from streamharness.sources.settings import SourceSettings
from streamharness.sources.timeline import FileTimeline, LiveTimeline, Sampler
from streamharness.sources.uploads import REPLICA_UPLOAD_BYTES, PullSlots, UploadBytes, UploadSpool, probe

__all__ = [
    "FileTimeline",
    "LiveTimeline",
    "PullSlots",
    "Puller",
    "REPLICA_UPLOAD_BYTES",
    "Sampler",
    "SourceSettings",
    "UploadBytes",
    "UploadSpool",
    "check_url",
    "classify",
    "probe",
    "redact",
    "rpc_code",
]
