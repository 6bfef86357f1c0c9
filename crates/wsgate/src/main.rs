use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a proxied handshake allocates and frees
/// a few dozen small objects across tasks, and glibc spent about 4 % of the
/// gateway's CPU on them (fastbin consolidation, aligned task cells); mimalloc's
/// per-thread free lists fit a thread-per-core gateway.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    wsgate::cli::main()
}

/// With transparent huge pages (`madvise`, mimalloc asks for them) the first
/// touch of a segment makes 2 MiB resident: an idle agent cost the gateway
/// 534 KiB of RSS instead of 29.5 KiB, an idle tunnel stream the agent 143
/// KiB instead of 18 (bench/tunnel/README.md, docs/cluster.md). A gateway
/// holds many idle connections, so it turns them off for itself (the flag
/// applies to every mapping at fault time, those mimalloc made already
/// included). `WSGATE_ALLOW_THP=1` keeps them.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("WSGATE_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no
        // memory of ours; a failure (old kernel) leaves THP as it was.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
