"""`python -m bench.huey_consumer REDIS_URL WORKERS thread|process`: plain
Huey's consumer running the bench's no-op task until SIGINT."""

from __future__ import annotations

import logging
import sys

from huey.consumer import Consumer

from bench.huey_app import PlainHuey

if __name__ == "__main__":
    url, workers, worker_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # Huey logs every task at INFO; our workers run at WARNING in the bench, so this one does too.
    logging.basicConfig(level=logging.WARNING)
    app = PlainHuey(url)
    Consumer(app.huey, workers=workers, worker_type=worker_type, periodic=False).run()
