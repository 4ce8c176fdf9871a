"""Read an offline W&B run file (run-*.wandb) without the network: its history rows and media files.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of records
(crc32 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last), whose payloads
are ``wandb_internal_pb2.Record`` protobufs.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < 7:  # trailer padding
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block_left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _items(run_file: Path, record_type: str):
    """(key, value) of every item of the records of one type ("history", "config") in file order."""
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == record_type:
            items = rec.history.item if record_type == "history" else rec.config.update
            for item in items:
                yield item.key or "/".join(item.nested_key), json.loads(item.value_json)


def records(run_file: Path) -> list[dict]:
    """Every history record (one ``run.log`` call) as {key: value}, in logging order; media fields are flattened
    (``samples/filenames``, ``samples/captions``; ``figures/forward/path``, ``.../caption``)."""
    out = []
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            out.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return out


def history(run_file: Path) -> dict[str, list]:
    """{metric key: [values in logging order]} from the run's history records."""
    out: dict[str, list] = {}
    for key, value in _items(run_file, "history"):
        out.setdefault(key, []).append(value)
    return out


def config(run_file: Path) -> dict:
    """The run's config as logged (``wandb.config``), merged over all config records."""
    return dict(_items(run_file, "config"))
