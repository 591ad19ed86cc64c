// txengine from Node.js: @grpc/grpc-js with the .proto files loaded at run time.
//
//   npm ci && node example.js [HOST:PORT]     (default $TXENGINE_ADDRESS, else 127.0.0.1:50051)
//
// Creates two accounts and a transfer, replays the transfer to see EXISTS (the id is the
// idempotency key), looks up the balances, and prints a JSON summary as its last line.
// Exits non-zero if the engine answers anything unexpected.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 10000;

const definition = protoLoader.loadSync('txengine/v1/ledger.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto (debit_account_id)
  longs: String, // uint64 amounts and int64 timestamps exceed 2^53: keep them exact
  enums: String, // results by name, e.g. TRANSFER_RESULT_OK
  bytes: Buffer,
  defaults: true,
});
const { LedgerService } = grpc.loadPackageDefinition(definition).txengine.v1;

// A UUIDv7-layout id: 48-bit milliseconds, version 7, variant, random bits; 16 bytes on the wire.
function newId() {
  const id = crypto.randomBytes(16);
  id.writeUIntBE(Date.now(), 0, 6);
  id[6] = (id[6] & 0x0f) | 0x70;
  id[8] = (id[8] & 0x3f) | 0x80;
  return id;
}

function uuid(id) {
  const hex = id.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function call(client, method, request) {
  const deadline = new Date(Date.now() + DEADLINE_MS);
  const metadata = new grpc.Metadata();
  metadata.set('x-correlation-id', crypto.randomUUID());
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

function expect(what, actual, expected) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${expected}, got ${actual}`);
  }
}

async function main() {
  const address = process.argv[2] || process.env.TXENGINE_ADDRESS || '127.0.0.1:50051';
  const client = new LedgerService(address, grpc.credentials.createInsecure());
  try {
    const alice = newId();
    const bob = newId();
    const created = await call(client, 'CreateAccounts', {
      accounts: [
        { id: alice, ledger: 1, code: 1 },
        { id: bob, ledger: 1, code: 1, flags: 2 /* DEBITS_MUST_NOT_EXCEED_CREDITS */ },
      ],
    });
    for (const result of created.results) {
      expect(`account ${result.index}`, result.result, 'ACCOUNT_RESULT_OK');
    }

    const transfer = {
      id: newId(), debit_account_id: alice, credit_account_id: bob, amount: '100',
      ledger: 1, code: 1,
    };
    const [first] = (await call(client, 'CreateTransfers', { transfers: [transfer] })).results;
    expect('transfer', first.result, 'TRANSFER_RESULT_OK');
    const [replay] = (await call(client, 'CreateTransfers', { transfers: [transfer] })).results;
    expect('replayed transfer', replay.result, 'TRANSFER_RESULT_EXISTS');
    expect('replay timestamp', replay.timestamp, first.timestamp);

    const found = await call(client, 'LookupAccounts', { ids: [alice, bob] });
    const balances = {};
    for (const account of found.accounts) {
      balances[uuid(account.id)] = {
        debits_posted: account.debits_posted, credits_posted: account.credits_posted,
      };
    }
    expect('alice debits', balances[uuid(alice)].debits_posted, '100');
    expect('bob credits', balances[uuid(bob)].credits_posted, '100');

    for (const [id, balance] of Object.entries(balances)) {
      console.log(`${id}  debits ${balance.debits_posted}  credits ${balance.credits_posted}`);
    }
    console.log(JSON.stringify({
      transfer: uuid(transfer.id), first: first.result, replay: replay.result,
      timestamp: first.timestamp, balances,
    }));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`txengine example failed: ${error.message}`);
  process.exit(1);
});
