// The two TCP peers of the browser example's mux demo, on free loopback ports:
//
//   node examples/browser/peers.mjs [--slow-rate BYTES_PER_SECOND]
//
// * echo: sends back every byte it reads, as fast as it can; after the
//   client's FIN it finishes echoing and sends its own (half-close).
// * slow: the same, but reads at most --slow-rate bytes per second (default
//   64 KiB/s). What it has not read stays in its socket buffers, so the
//   gateway stops writing to it, stops crediting the stream, and the page's
//   writer for that stream waits: wsmux flow control, one stream at a time.
//
// Prints `echo tcp://127.0.0.1:PORT` and `slow tcp://127.0.0.1:PORT` once
// both listen, then runs until killed.
import net from "node:net";

let rate = 64 * 1024;
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--slow-rate") rate = Number(args[++i]);
  else {
    console.error(`unknown argument ${args[i]}`);
    process.exit(2);
  }
}
if (!(rate > 0)) {
  console.error("--slow-rate must be a positive number");
  process.exit(2);
}

function echo(socket) {
  socket.on("error", () => socket.destroy());
  socket.pipe(socket); // ends our side after the client's FIN, once all is written
}

const TICK_MS = 50;

function slowEcho(socket) {
  socket.on("error", () => socket.destroy());
  socket.pause();
  let ended = false;
  socket.on("end", () => (ended = true));
  const budgetPerTick = Math.max(1, Math.round((rate * TICK_MS) / 1000));
  const timer = setInterval(() => {
    let budget = budgetPerTick;
    let chunk;
    while (budget > 0 && (chunk = socket.read()) !== null) {
      if (chunk.length > budget) {
        socket.unshift(chunk.subarray(budget));
        chunk = chunk.subarray(0, budget);
      }
      budget -= chunk.length;
      socket.write(chunk);
    }
    if (ended && socket.readableLength === 0) {
      clearInterval(timer);
      socket.end();
    }
  }, TICK_MS);
  socket.on("close", () => clearInterval(timer));
}

function listen(handler) {
  return new Promise((resolve, reject) => {
    const server = net.createServer({ allowHalfOpen: true }, handler);
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server.address().port));
  });
}

const echoPort = await listen(echo);
const slowPort = await listen(slowEcho);
console.log(`echo tcp://127.0.0.1:${echoPort}`);
console.log(`slow tcp://127.0.0.1:${slowPort}`);
