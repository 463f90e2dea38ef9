"""kombu's filesystem transport, with messages that appear in the queue folder whole.

The stock transport creates a message's file in the queue folder and then writes it; a worker
listing the folder in between takes the empty file, fails to decode it and stops with
"Unrecoverable error: JSONDecodeError" (the embedded ``./bin/run`` hit it within a minute). Its
file lock does not help: the reader renames the file without taking the lock. Here a message is
written beside the folder and renamed into it, which is atomic on one filesystem, so a reader
finds it complete or not at all. Everything else is kombu's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

STAGING = "staging"  # beside the queue folder, on the same filesystem


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # The name kombu gives a message (its readers sort and filter by it).
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        staged = folder.parent / STAGING / name
        staged.parent.mkdir(exist_ok=True)
        staged.write_bytes(str_to_bytes(dumps(payload)))
        os.replace(staged, folder / name)


class Transport(filesystem.Transport):
    Channel = Channel
