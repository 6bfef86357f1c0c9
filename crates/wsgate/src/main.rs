use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a proxied handshake allocates and frees
/// a few dozen small objects across tasks, and glibc spent about 4 % of the
/// gateway's CPU on them (fastbin consolidation, aligned task cells); mimalloc's
/// per-thread free lists fit a thread-per-core gateway.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    wsgate::cli::main()
}
