// Peer for the MLLP benchmark: @medplum/hl7's Hl7Server answering every message with an AA
// built by Hl7Message.buildAck(). It stores nothing (no durability), so the comparison is
// Tributary's store-before-ACK against a pure parse-and-ACK loop.
// Usage: node medplum_server.mjs PORT   (with @medplum/hl7 installed: npm install @medplum/hl7)
import { Hl7Server } from '@medplum/hl7';

const port = Number(process.argv[2] || 2576);
const server = new Hl7Server((connection) => {
  connection.addEventListener('message', ({ message }) => {
    connection.send(message.buildAck());
  });
});
await server.start(port);
console.log(`medplum Hl7Server listening on ${port}`);
