// libp2p 3 (yamux 8) calls Promise.withResolvers, which Node 22 has and
// Node 20 does not: the standard semantics, for Node 20.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function withResolvers() {
    let resolve, reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}
