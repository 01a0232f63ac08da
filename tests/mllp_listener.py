"""A RIS interface's HL7 v2 listener for tests: python-hl7's MLLP server in its own process.

    python tests/mllp_listener.py PORT_FILE OUT_DIR [accept|reject]

Listens on 127.0.0.1 (a free port, written to PORT_FILE once listening), stores every message it receives as
OUT_DIR/NNNNN.hl7 (as received), and answers each with an ACK: AA (accept) or AE with a reason (reject), the
way an interface engine's channel answers. Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import hl7
import hl7.mllp


async def main(port_file: Path, out: Path, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    count = 0

    async def handle(reader, writer) -> None:
        nonlocal count
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                count += 1
                (out / f"{count:05d}.hl7").write_bytes(str(msg).encode("utf-8"))  # as received: CR-separated
                control = str(msg.segment("MSH")[10])
                code, why = ("AA", "") if mode == "accept" else ("AE", "unknown patient: not in the RIS")
                ack = (f"MSH|^~\\&|RIS|HOSP|CXR-EDGE||{time.strftime('%Y%m%d%H%M%S')}||ACK^R01^ACK|A{count}|P|2.5.1\r"
                       f"MSA|{code}|{control}|{why}\r")
                writer.writemessage(hl7.parse(ack))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", 0, encoding="utf-8")
    tmp = port_file.with_suffix(".part")
    tmp.write_text(str(server.sockets[0].getsockname()[1]))
    tmp.replace(port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "accept"))
