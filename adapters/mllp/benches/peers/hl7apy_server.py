"""Peer for the MLLP benchmark: hl7apy's MLLPServer answering every message with an AA.

It stores nothing (no durability). Usage: python hl7apy_server.py PORT  (pip install hl7apy)
"""
import sys

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


class AckHandler(AbstractHandler):
    def reply(self):
        msg = parse_message(self.incoming_message, find_groups=False)
        ack = Message("ACK", version=msg.msh.msh_12.value or "2.5")
        ack.msh.msh_3 = msg.msh.msh_5.value or "TRIB"
        ack.msh.msh_4 = msg.msh.msh_6.value
        ack.msh.msh_5 = msg.msh.msh_3.value
        ack.msh.msh_6 = msg.msh.msh_4.value
        ack.msh.msh_9 = "ACK"
        ack.msh.msh_10 = "A" + msg.msh.msh_10.value[:15]
        ack.msh.msh_11 = msg.msh.msh_11.value or "P"
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = msg.msh.msh_10.value
        return ack.to_mllp()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 2577
    handlers = {"ADT^A01^ADT_A01": (AckHandler,), "ORU^R01^ORU_R01": (AckHandler,),
                "ADT^A01": (AckHandler,), "ORU^R01": (AckHandler,)}
    server = MLLPServer("127.0.0.1", port, handlers)
    print(f"hl7apy MLLPServer listening on {port}", flush=True)
    server.serve_forever()
