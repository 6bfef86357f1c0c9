//! What a connection's permessage-deflate states hold, counted by the
//! allocator (live bytes): busy (after a message each way) and hibernated.
//! The figures in docs/deflate.md come from here
//! (`cargo test -p wsframe --test deflate_memory -- --nocapture`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::BytesMut;
use wsframe::deflate::{Deflater, Inflater};
use wsframe::Role;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn message() -> Vec<u8> {
    (0..400)
        .flat_map(|i| {
            format!("{{\"id\":{i},\"user\":\"u{}\",\"ok\":true}},", i * 7 % 13).into_bytes()
        })
        .collect()
}

/// Live bytes of (a compressor, a decompressor) for `bits`, with and
/// without context takeover: when first made, after a 12 KB message, and
/// after hibernation.
fn measure(bits: u8, takeover: bool) -> [isize; 4] {
    let msg = message();
    let mut compressed = vec![];
    Deflater::new(6, bits, true, 0, Role::Server).compress(&msg, &mut compressed);

    let base = live();
    let mut d = Deflater::new(6, bits, !takeover, 0, Role::Server);
    let made = live() - base;
    let mut out = BytesMut::new();
    d.encode(&mut out, wsframe::OpCode::Text, &msg);
    drop(out);
    let c_busy = live() - base;
    d.hibernate();
    let c_idle = live() - base;

    let base = live();
    let mut i = Inflater::new(bits, !takeover, 0);
    i.begin(false);
    let mut at = 0;
    loop {
        let mut out = BytesMut::new();
        let step = i
            .inflate(&compressed[at..], true, &mut out, 64 * 1024)
            .unwrap();
        at += step.consumed;
        if step.done {
            break;
        }
    }
    let d_busy = live() - base;
    i.hibernate();
    let d_idle = live() - base;
    assert!(
        made < 1024,
        "nothing is allocated before the first message: {made}"
    );
    drop((d, i));
    [c_busy, c_idle, d_busy, d_idle]
}

#[test]
fn memory_of_the_zlib_states() {
    let kib = |b: isize| format!("{:.1} KiB", b as f64 / 1024.0);
    for bits in [15u8, 12, 9] {
        for takeover in [true, false] {
            let [c_busy, c_idle, d_busy, d_idle] = measure(bits, takeover);
            println!(
                "bits {bits:>2} takeover {takeover:>5}: compressor busy {} idle {}; \
                 decompressor busy {} idle {}",
                kib(c_busy),
                kib(c_idle),
                kib(d_busy),
                kib(d_idle)
            );
            // Hibernated: at most the window (context takeover), else nothing.
            let window = if takeover { 1isize << bits } else { 0 };
            assert!(c_idle <= window, "compressor keeps {c_idle} B");
            assert!(d_idle <= window, "decompressor keeps {d_idle} B");
            // Busy: the zlib states, which are much bigger.
            assert!(c_busy > 4 * (1 << bits), "{c_busy}");
            if bits == 15 {
                assert!(
                    c_busy < 400 * 1024 && d_busy < 100 * 1024,
                    "{c_busy} {d_busy}"
                );
            }
        }
    }
}
