"""`cxr-edge serve` with a fault-injecting engine, for tests/test_faults.py (run as a subprocess).

The wrapped engine reads a control file before every batch: ``ok``, ``raise`` or ``stall:SECONDS``,
so a test can make the real engine fail or hang while load is running, then recover.

    python tests/fault_server.py ARTIFACT PORT CONTROL_FILE '{"timeout_s": 1, ...}'
"""

import json
import sys
import time
from pathlib import Path


class FaultyEngine:
    def __init__(self, engine, control: Path):
        self._engine, self._control = engine, control
        self.batches = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def infer(self, batch, outputs=None):
        self.batches += 1
        mode = self._control.read_text().strip() if self._control.exists() else "ok"
        if mode == "raise":
            raise RuntimeError("injected engine failure")
        if mode.startswith("stall:"):
            time.sleep(float(mode.split(":", 1)[1]))
        return self._engine.infer(batch, outputs)


def main(argv):
    from cxr_edge.serve.app import ServeConfig, create_app
    from cxr_edge.serve.http_guard import TransportLimits, run_server

    artifact, port, control = argv[0], int(argv[1]), Path(argv[2])
    opts = json.loads(argv[3]) if len(argv) > 3 else {}
    transport = {k: opts.pop(k) for k in list(opts) if k in TransportLimits.__dataclass_fields__}
    cfg = ServeConfig(device="cpu", **opts)
    app = create_app(artifact, cfg, engine_wrapper=lambda e: FaultyEngine(e, control))
    run_server(app, "127.0.0.1", port, limits=TransportLimits(**transport), graceful_timeout_s=cfg.timeout_s)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
